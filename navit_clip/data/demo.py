"""The embedded demo datasets: images whose class only their *shape* decides.

Generated on first use into a git-ignored folder (default `demo_data/`), never committed:
    train-{0000..K}.tar   image-text pairs (img2dataset layout: KEY.jpg/png + KEY.txt + KEY.json)
    heldout-0000.tar      held-out pairs whose KEY.cls holds the class index, for zero-shot eval
    heldout/CLASS/*.png   the same held-out images as an image folder (ROOT/CLASS_NAME/IMAGE)
    classnames.txt        one class name per line ("circle", "star", ...)

Two tasks, ten classes each (`TASKS`):
    glyphs   the demo's: a digit (Pillow's bundled font, random weight, stretch and rotation) named
             in words ("seven"), like scanned characters but in random colours;
    shapes   the learning race's: circle, star, heart, ... (harder: thin differences such as ring
             against circle, polarity and texture noise).
Each image shows one glyph or shape in a random colour on a random, textured background of another
colour; the image size (longer side 48..192 px), aspect ratio (1:2..2:1), the figure's size, position
and a small rotation are random too. Colour, size and position therefore carry no information about
the class: a model has to learn shapes. Captions name the class and often its colours and size (as
web captions would), so a model can also learn colour words, but zero-shot prompts name the class
only. Writing goes through webdataset's ShardWriter (`shards.shard_writer`).
"""

from __future__ import annotations

import colorsys
import io
import json
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter, ImageFont

Draw = Callable[[random.Random, str], tuple[Image.Image, str]]

SHAPES = ("circle", "square", "triangle", "star", "plus", "cross", "ring", "crescent", "arrow", "heart")
CLASSNAMES = sorted(SHAPES)  # sorted: the order an image folder (ROOT/CLASS/IMAGE) labels them in
COLOR_NAMES = {  # hue (degrees) -> name, for captions
    0: "red",
    30: "orange",
    55: "yellow",
    120: "green",
    180: "cyan",
    225: "blue",
    275: "purple",
    320: "pink",
}

TEMPLATES = (
    "a {shape}",
    "a photo of a {shape}.",
    "a {fg} {shape} on a {bg} background",
    "{shape}, {fg}",
    "a drawing of a {shape}",
    "there is a {size} {shape} in the picture",
    "a {size} {fg} {shape}",
    "an image showing one {shape} coloured {fg}",
)
CONTRAST = 0.45  # least lightness difference between a shape and its background
ZEROSHOT_TEMPLATES = ("a {}.", "a photo of a {}.", "a drawing of a {}.")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
GLYPH_TEMPLATES = (  # most name the digit only, a few its colours too (a model learns colour words first)
    "the digit {name}",
    "the number {name}",
    "{name}",
    "a picture of the number {name}.",
    "a sign showing the digit {name}",
    "a {size} {name}",
    "a {fg} {name} on a {bg} background",
    "{name}, written in {fg}",
)
GLYPH_ZEROSHOT_TEMPLATES = ("the digit {}.", "the number {}.", "a picture of the number {}.")
DONE = "DONE"


def _color(
    rng: random.Random, avoid_lightness: float | None = None, span: tuple[float, float] | None = None
) -> tuple[tuple[int, int, int], str, float]:
    """A random colour, its caption name and its lightness. With `avoid_lightness`, the lightness is
    drawn from [0.02, 0.98] at least CONTRAST away from it (sampled directly, never by rejection);
    with `span`, from that range."""
    hue, saturation = rng.uniform(0, 360), rng.uniform(0.0, 1.0)
    if span is not None:
        lightness = rng.uniform(*span)
    elif avoid_lightness is None:
        lightness = rng.uniform(0.1, 0.9)
    else:
        below = (0.02, avoid_lightness - CONTRAST)
        above = (avoid_lightness + CONTRAST, 0.98)
        spans = [s for s in (below, above) if s[1] > s[0]]
        widths = [s[1] - s[0] for s in spans]
        lo, hi = spans[0] if len(spans) == 1 or rng.random() * sum(widths) < widths[0] else spans[1]
        lightness = rng.uniform(lo, hi)
    r, g, b = colorsys.hls_to_rgb(hue / 360, lightness, saturation)
    if saturation < 0.25:
        name = "black" if lightness < 0.3 else "white" if lightness > 0.7 else "grey"
    else:
        name = COLOR_NAMES[min(COLOR_NAMES, key=lambda h: min(abs(h - hue), 360 - abs(h - hue)))]
    return (int(255 * r), int(255 * g), int(255 * b)), name, lightness


def _rotate(
    points: list[tuple[float, float]], cx: float, cy: float, angle: float
) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + c * (x - cx) - s * (y - cy), cy + s * (x - cx) + c * (y - cy)) for x, y in points]


def _outline(shape: str, cx: float, cy: float, r: float) -> list[list[tuple[float, float]]]:
    """Polygons of `shape` at centre (cx, cy), radius r (draw_shape cuts the ring's and crescent's holes)."""
    if shape in ("circle", "ring", "crescent"):
        return [
            [(cx + r * math.cos(t * math.pi / 32), cy + r * math.sin(t * math.pi / 32)) for t in range(64)]
        ]
    if shape == "square":
        r *= 0.85
        return [[(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]]
    if shape == "triangle":
        return [[(cx, cy - r), (cx + 0.95 * r, cy + 0.75 * r), (cx - 0.95 * r, cy + 0.75 * r)]]
    if shape == "star":
        return [
            [
                (cx + rr * math.sin(k * math.pi / 5), cy - rr * math.cos(k * math.pi / 5))
                for k in range(10)
                for rr in [r if k % 2 == 0 else 0.42 * r]
            ]
        ]
    if shape in ("plus", "cross"):
        t = 0.3 * r
        bars = [
            [(cx - r, cy - t), (cx + r, cy - t), (cx + r, cy + t), (cx - r, cy + t)],
            [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy + r), (cx - t, cy + r)],
        ]
        return bars if shape == "plus" else [_rotate(p, cx, cy, math.pi / 4) for p in bars]
    if shape == "arrow":
        t, head = 0.25 * r, 0.1 * r
        return [
            [
                (cx - r, cy - t),
                (cx + head, cy - t),
                (cx + head, cy - 0.8 * r),
                (cx + r, cy),
                (cx + head, cy + 0.8 * r),
                (cx + head, cy + t),
                (cx - r, cy + t),
            ]
        ]
    if shape == "heart":
        pts = []
        for k in range(64):
            t = 2 * math.pi * k / 64  # the classic heart curve, scaled to radius r
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + r * x / 17, cy - r * (y + 2) / 17))
        return [pts]
    raise ValueError(f"unknown shape {shape!r}")


def _canvas(rng: random.Random, ink: bool = False) -> tuple[Image.Image, tuple, tuple, str, str]:
    """A textured background of random size (longer side 48..192 px, aspect 1:2..2:1) and colour,
    and a figure colour at least CONTRAST lighter or darker (`ink`: always darker, like ink on paper):
    (image, figure and background rgb, their colour names)."""
    long_side = int(math.exp(rng.uniform(math.log(48), math.log(192))))
    aspect = math.exp(rng.uniform(-math.log(2), math.log(2)))
    W, H = (long_side, round(long_side / aspect)) if aspect >= 1 else (round(long_side * aspect), long_side)
    W, H = max(16, W), max(16, H)
    if ink:
        bg, bg_name, bg_light = _color(rng, span=(0.55, 0.98))
        fg, fg_name, _ = _color(rng, span=(0.02, bg_light - CONTRAST))
    else:
        bg, bg_name, bg_light = _color(rng)
        fg, fg_name, _ = _color(rng, avoid_lightness=bg_light)
    # texture from the seeded rng (PIL's effect_noise has its own unseeded generator: not reproducible)
    img = Image.frombytes("L", (W, H), rng.randbytes(W * H)).convert("RGB")
    img = Image.blend(Image.new("RGB", (W, H), bg), img, rng.uniform(0.0, 0.15))
    return img, fg, bg, fg_name, bg_name


def _maybe_blur(img: Image.Image, rng: random.Random) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0))) if rng.random() < 0.3 else img


def draw_shape(rng: random.Random, shape: str) -> tuple[Image.Image, str]:
    """One image of `shape` (random size, aspect, colours, position, rotation) and a caption for it."""
    img, fg, bg, fg_name, bg_name = _canvas(rng)
    W, H = img.size
    short = min(W, H)
    frac = rng.uniform(0.6, 0.95)
    r = short * frac / 2
    cx, cy = rng.uniform(r, W - r), rng.uniform(r, H - r)
    angle = math.radians(rng.uniform(-15, 15))
    d = ImageDraw.Draw(img)
    for poly in _outline(shape, cx, cy, r):
        d.polygon(_rotate(poly, cx, cy, angle), fill=fg)
    if shape == "ring":  # cut the hole
        d.polygon(_rotate(_outline("circle", cx, cy, 0.55 * r)[0], cx, cy, angle), fill=bg)
    elif shape == "crescent":  # a bite out of one side
        d.polygon(
            _rotate(_outline("circle", cx + 0.45 * r, cy - 0.2 * r, 0.8 * r)[0], cx, cy, angle), fill=bg
        )
    img = _maybe_blur(img, rng)  # before the caption: the rng order of shapes-v4
    size = "small" if frac < 0.75 else "large"
    return img, rng.choice(TEMPLATES).format(shape=shape, fg=fg_name, bg=bg_name, size=size)


@lru_cache(maxsize=128)
def _glyph_mask(char: str, weight: int) -> Image.Image:
    """`char` in Pillow's bundled font (always there, no system fonts needed) at 96 px, as a mask."""
    font = ImageFont.load_default(size=96)
    left, top, right, bottom = font.getbbox(char, stroke_width=weight)
    mask = Image.new("L", (right - left + 8, bottom - top + 8), 0)
    ImageDraw.Draw(mask).text(
        (4 - left, 4 - top), char, fill=255, font=font, stroke_width=weight, stroke_fill=255
    )
    return mask


def draw_glyph(rng: random.Random, name: str) -> tuple[Image.Image, str]:
    """One image of the digit `name` ("seven": random weight, stretch, size, position, rotation and
    colours) and a caption for it."""
    img, fg, _, fg_name, bg_name = _canvas(rng, ink=True)
    W, H = img.size
    mask = _glyph_mask(str(DIGITS.index(name)), rng.randrange(0, 7))
    mask = mask.rotate(rng.uniform(-15, 15), resample=Image.BICUBIC, expand=True)
    mask = mask.crop(mask.getbbox())
    frac = rng.uniform(0.6, 0.95)
    h = frac * H
    w = h * mask.width / mask.height * math.exp(rng.uniform(-0.4, 0.4))
    if w > 0.95 * W:
        h, w = h * 0.95 * W / w, 0.95 * W
    w, h = max(2, round(w)), max(2, round(h))
    x, y = rng.randrange(0, W - w + 1), rng.randrange(0, H - h + 1)
    img.paste(Image.new("RGB", (w, h), fg), (x, y), mask.resize((w, h), Image.BICUBIC))
    img = _maybe_blur(img, rng)
    size = "small" if frac < 0.75 else "large"
    return img, rng.choice(GLYPH_TEMPLATES).format(name=name, fg=fg_name, bg=bg_name, size=size)


@dataclass(frozen=True)
class Task:
    kind: str  # recorded in the DONE marker: a change of generator regenerates the data
    classnames: tuple[str, ...]  # sorted: the order an image folder (ROOT/CLASS/IMAGE) labels them in
    draw: Draw
    zeroshot_templates: tuple[str, ...]


def _encode(img: Image.Image, rng: random.Random) -> tuple[str, bytes]:
    buf = io.BytesIO()
    if rng.random() < 0.8:
        img.save(buf, format="JPEG", quality=90)
        return "jpg", buf.getvalue()
    img.save(buf, format="PNG")
    return "png", buf.getvalue()


def _write_split(
    root: Path,
    prefix: str,
    n: int,
    per_shard: int,
    seed: int,
    draw: Draw,
    classnames: list[str],
    with_label: bool,
    folder: Path | None = None,
) -> None:
    from navit_clip.data.shards import shard_writer

    rng = random.Random(seed)
    with shard_writer(str(root / f"{prefix}-%04d.tar"), per_shard) as sink:
        for i in range(n):
            cls = rng.randrange(len(classnames))
            img, caption = draw(rng, classnames[cls])
            ext, data = _encode(img, rng)
            sample = {
                "__key__": f"{prefix}{i:06d}",
                ext: data,
                "txt": caption,
                "json": json.dumps({"width": img.width, "height": img.height, "class": classnames[cls]}),
            }
            if with_label:
                sample["cls"] = str(cls)
            sink.write(sample)
            if folder is not None:
                (folder / classnames[cls]).mkdir(parents=True, exist_ok=True)
                (folder / classnames[cls] / f"{prefix}{i:06d}.{ext}").write_bytes(data)


def ensure_dataset(
    root: str | os.PathLike,
    spec: dict,
    classnames: list[str],
    draw_train: Draw,
    draw_heldout: Draw,
    n_train: int,
    n_heldout: int,
    per_shard: int = 1000,
    seed: int = 0,
) -> dict[str, str]:
    """Write a generated image-text dataset into `root` unless the same one (`spec`) is already there.

    `draw_*(rng, classname) -> (image, caption)` make the training pairs and the held-out images.
    Returns {"train": brace pattern, "heldout": shard, "heldout_folder": image folder, "classnames":
    path}. A DONE marker is written last, so an interrupted generation is redone rather than half-used.
    """
    root = Path(root)
    n_shards = math.ceil(n_train / per_shard)
    spec = {**spec, "n_train": n_train, "n_heldout": n_heldout, "per_shard": per_shard, "seed": seed}
    marker = root / DONE
    folder = root / "heldout"
    if not (marker.exists() and json.loads(marker.read_text()) == spec):
        import shutil

        root.mkdir(parents=True, exist_ok=True)
        marker.unlink(missing_ok=True)
        for old in root.glob("*.tar"):
            old.unlink()
        shutil.rmtree(folder, ignore_errors=True)
        _write_split(root, "train", n_train, per_shard, seed, draw_train, classnames, with_label=False)
        _write_split(root, "heldout", n_heldout, n_heldout, seed + 1, draw_heldout, classnames, True, folder)
        (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(spec))
        tmp.replace(marker)
    return {
        "train": str(root / f"train-{{0000..{n_shards - 1:04d}}}.tar"),
        "heldout": str(root / "heldout-0000.tar"),
        "heldout_folder": str(folder),
        "classnames": str(root / "classnames.txt"),
    }


TASKS = {
    "glyphs": Task("glyphs-v3", tuple(sorted(DIGITS)), draw_glyph, GLYPH_ZEROSHOT_TEMPLATES),
    "shapes": Task("shapes-v4", tuple(CLASSNAMES), draw_shape, ZEROSHOT_TEMPLATES),
}


def ensure_demo_data(
    root: str | os.PathLike = "demo_data",
    n_train: int = 8000,
    n_heldout: int = 500,
    per_shard: int = 1000,
    seed: int = 0,
    task: str = "glyphs",
) -> dict[str, str]:
    """Generate a demo task's dataset (`TASKS`) into `root` unless a complete set is already there
    (paths as `ensure_dataset` returns them)."""
    t = TASKS[task]
    return ensure_dataset(
        root, {"kind": t.kind}, list(t.classnames), t.draw, t.draw, n_train, n_heldout, per_shard, seed
    )
