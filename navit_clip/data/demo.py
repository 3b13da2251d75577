"""The embedded demo dataset: synthetic coloured shapes at varied sizes and aspect ratios.

Generated on first use into a git-ignored folder (default `demo_data/`), never committed:
    train-{0000..K}.tar   image-text pairs (img2dataset layout: KEY.jpg/png + KEY.txt + KEY.json)
    heldout-0000.tar      held-out pairs whose KEY.cls holds the class index, for zero-shot eval
    classnames.txt        one class name per line ("red circle", ...)
Images: longer side 32..512 px, aspect ratio 1:4..4:1, one shape of one colour on a textured
background; captions from varied templates. Writing goes through webdataset's ShardWriter.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
CLASSNAMES = [f"{c} {s}" for c in COLORS for s in SHAPES]

TEMPLATES = (
    "a {color} {shape}",
    "a photo of a {color} {shape}.",
    "a {size} {color} {shape} on a {bg} background",
    "{shape}, {color}",
    "a drawing of a {color} {shape}",
    "there is a {color} {shape} in the picture",
    "a {color} {shape} seen from above",
    "an image showing one {size} {shape} coloured {color}",
)
ZEROSHOT_TEMPLATES = ("a {}.", "a photo of a {}.", "a drawing of a {}")
DONE = "DONE"


def _draw(rng: random.Random, color: str, shape: str) -> tuple[Image.Image, str, str]:
    long_side = int(math.exp(rng.uniform(math.log(32), math.log(512))))
    aspect = math.exp(rng.uniform(-math.log(4), math.log(4)))
    W, H = (
        (long_side, max(8, int(long_side / aspect)))
        if aspect >= 1
        else (max(8, int(long_side * aspect)), long_side)
    )
    dark = rng.random() < 0.5
    base = rng.randint(20, 90) if dark else rng.randint(170, 240)
    img = (
        Image.effect_noise((W, H), rng.uniform(5, 30))
        .point(lambda v, b=base: b + (v - 128) // 4)
        .convert("RGB")
    )
    d = ImageDraw.Draw(img)
    short = min(W, H)
    frac = rng.uniform(0.4, 0.9)
    r = max(3, int(short * frac / 2))
    cx, cy = rng.randint(r, max(r, W - r)), rng.randint(r, max(r, H - r))
    fill = tuple(min(255, max(0, v + rng.randint(-25, 25))) for v in COLORS[color])
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        t = max(1, r // 3)
        d.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        d.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    return img, ("small" if frac < 0.6 else "large"), ("dark" if dark else "light")


def _encode(img: Image.Image, rng: random.Random) -> tuple[str, bytes]:
    buf = io.BytesIO()
    if rng.random() < 0.8:
        img.save(buf, format="JPEG", quality=90)
        return "jpg", buf.getvalue()
    img.save(buf, format="PNG")
    return "png", buf.getvalue()


def _write_split(root: Path, prefix: str, n: int, per_shard: int, seed: int, with_label: bool) -> None:
    import webdataset as wds

    rng = random.Random(seed)
    with wds.ShardWriter(str(root / f"{prefix}-%04d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(n):
            cls = rng.randrange(len(CLASSNAMES))
            color, shape = CLASSNAMES[cls].split()
            img, size, bg = _draw(rng, color, shape)
            caption = rng.choice(TEMPLATES).format(color=color, shape=shape, size=size, bg=bg)
            ext, data = _encode(img, rng)
            sample = {
                "__key__": f"{prefix}{i:06d}",
                ext: data,
                "txt": caption,
                "json": json.dumps({"width": img.width, "height": img.height, "class": CLASSNAMES[cls]}),
            }
            if with_label:
                sample["cls"] = str(cls)
            sink.write(sample)


def ensure_demo_data(
    root: str | os.PathLike = "demo_data",
    n_train: int = 6000,
    n_heldout: int = 480,
    per_shard: int = 1000,
    seed: int = 0,
) -> dict[str, str]:
    """Generate the demo shards into `root` unless a complete set is already there.

    Returns {"train": brace pattern, "heldout": pattern, "classnames": path}. A DONE marker is written
    last, so an interrupted generation is redone rather than half-used.
    """
    root = Path(root)
    n_shards = math.ceil(n_train / per_shard)
    spec = {"n_train": n_train, "n_heldout": n_heldout, "per_shard": per_shard, "seed": seed}
    marker = root / DONE
    if not (marker.exists() and json.loads(marker.read_text()) == spec):
        root.mkdir(parents=True, exist_ok=True)
        for old in root.glob("*.tar"):
            old.unlink()
        _write_split(root, "train", n_train, per_shard, seed, with_label=False)
        _write_split(root, "heldout", n_heldout, n_heldout, seed + 1, with_label=True)
        (root / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(spec))
        tmp.replace(marker)
    return {
        "train": str(root / f"train-{{0000..{n_shards - 1:04d}}}.tar"),
        "heldout": str(root / "heldout-0000.tar"),
        "classnames": str(root / "classnames.txt"),
    }
