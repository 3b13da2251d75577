"""Decoding one image-text sample robustly: every failure is a `BadSample` with a countable reason."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

from PIL import Image, ImageOps

# the keys an image goes by in a shard, and the image files an image folder reads (PIL decodes them all)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")

# Skip reasons, counted per worker and reported with every batch.
ORIENTATION = 0x0112  # the EXIF tag
SKIP_REASONS = (
    "undecodable",
    "no_image",
    "no_caption",
    "no_label",
    "empty_image",
    "aspect_ratio",
    "too_many_pixels",
)


class BadSample(Exception):
    """A sample the pipeline skips; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def decode_image(
    data: bytes,
    max_pixels: int,
    max_aspect: float,
    size_fn: Callable[[int, int], tuple[int, int]] | None = None,
) -> tuple[Image.Image, tuple[int, int]]:
    """Bytes -> (RGB PIL image, target (H, W)), EXIF orientation applied.

    Palette, alpha (composited on white), CMYK, 16-bit and grayscale images become 8-bit RGB.
    Raises BadSample for undecodable data, zero-size images (0 bytes or a 0-pixel side), more than
    `max_pixels` pixels (checked from the header, before decoding: a decompression bomb never gets
    decoded) and aspect ratios beyond `max_aspect`:1.

    `size_fn(height, width)` (of the upright image) gives the size the caller will resize to; a
    JPEG is then decoded directly at the smallest 1/2, 1/4 or 1/8 scale still at least that large
    (libjpeg's DCT scaling), which saves most of the decoding time for large photos.
    """
    if not data:
        raise BadSample("empty_image", "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w == 0 or h == 0:
                raise BadSample("empty_image", f"{w}x{h}")
            if w * h > max_pixels:
                raise BadSample("too_many_pixels", f"{w}x{h} > {max_pixels}")
            if max(w, h) / min(w, h) > max_aspect:
                raise BadSample("aspect_ratio", f"{w}x{h} beyond {max_aspect}:1")
            if img.format == "JPEG" and size_fn:
                # EXIF sits before the pixels in a JPEG: size first, then decode at a reduced scale
                transposed = img.getexif().get(ORIENTATION, 1) in (5, 6, 7, 8)
                target = size_fn(w, h) if transposed else size_fn(h, w)
                img.draft("RGB", (target[0], target[1]) if transposed else (target[1], target[0]))
                img = ImageOps.exif_transpose(img)
                img.load()
            else:
                img = ImageOps.exif_transpose(img)
                img.load()
                target = size_fn(img.height, img.width) if size_fn else (img.height, img.width)
    except BadSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadSample("too_many_pixels", str(e)) from e
    except Exception as e:  # PIL raises many types for corrupt data
        raise BadSample("undecodable", f"{type(e).__name__}: {e}") from e
    return to_rgb(img), target


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale the value range down to 8 bits
        import numpy as np

        arr = np.asarray(img, dtype=np.float32)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.rint(arr * (255.0 / top)).clip(0, 255).astype("uint8"))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def find_image(sample: dict) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise BadSample("no_image", f"keys {sorted(k for k in sample if not k.startswith('__'))}")


def find_caption(sample: dict) -> str:
    raw = sample.get("txt")
    if raw is None:
        raise BadSample("no_caption")
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
    text = text.strip()
    if not text:
        raise BadSample("no_caption", "empty")
    return text
