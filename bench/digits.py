"""A second race task from real scans: scikit-learn's handwritten digits (the UCI optdigits scans,
1797 images of 8 x 8 ink counts, bundled with scikit-learn; nothing is downloaded).

Black ink on white, ten classes named "zero" .. "nine", each image a source scan resampled (bicubic)
to a random size (longer side 24..160 px) and aspect ratio (1:2..2:1), captions from a few
templates. The held-out images come from scans the training pairs never use (the last 300), so the
zero-shot figure measures recognising new handwriting. Shape is everything here, colour nothing.

`digits_es` is the same scans named and captioned in Spanish ("cero" .. "nueve", "el número siete
escrito a mano"): a target whose class names and caption words no race checkpoint has read. The
shape task's captions (English shape, colour and size words) and the English digits' share no word with
it; most of its names are several BPE pieces ("cuatro", "nueve"), some pieces shared between names.

    python bench/learning_race.py --task digits     (needs `pip install scikit-learn`)
"""

from __future__ import annotations

import math
import os
import random

import numpy as np
from PIL import Image

from navit_clip.data.demo import ensure_dataset

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CLASSNAMES = sorted(NAMES)  # the order an image folder labels them in
TEMPLATES = (
    "a handwritten {name}",
    "a scan of the digit {name}",
    "the number {name}",
    "{name}",
    "a photo of a handwritten {name}.",
    "the digit {name}, written in black ink",
)
ZEROSHOT_TEMPLATES = ("a handwritten {}.", "the digit {}.", "the number {}.")
# The Spanish names, in the English NAMES' order (the scans' labels), and captions worded unlike the
# English templates (and unlike the shape task's)
NAMES_ES = ("cero", "uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve")
TEMPLATES_ES = (
    "un {name} escrito a mano",
    "el número {name}",
    "la cifra {name}, en tinta negra",
    "{name}",
    "escaneo de un {name} manuscrito",
    "aquí pone {name}",
)
ZEROSHOT_TEMPLATES_ES = ("un {} escrito a mano.", "el número {}.", "la cifra {}.")
HELDOUT_SCANS = 300


def _scans() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise SystemExit("the digits task needs scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    return d.images, d.target


def _drawer(images: np.ndarray, labels: np.ndarray, names=NAMES, templates=TEMPLATES):
    by_name = {name: np.flatnonzero(labels == names.index(name)) for name in names}

    def draw(rng: random.Random, name: str) -> tuple[Image.Image, str]:
        scan = images[rng.choice(by_name[name])]
        ink = Image.fromarray((255 - scan * (255 / 16)).astype(np.uint8), mode="L")
        long_side = int(math.exp(rng.uniform(math.log(24), math.log(160))))
        aspect = math.exp(rng.uniform(-math.log(2), math.log(2)))
        W, H = (
            (long_side, round(long_side / aspect)) if aspect >= 1 else (round(long_side * aspect), long_side)
        )
        img = ink.resize((max(8, W), max(8, H)), Image.BICUBIC).convert("RGB")
        return img, rng.choice(templates).format(name=name)

    return draw


def ensure_digit_data(
    root: str | os.PathLike, n_train: int = 6000, n_heldout: int = 300, seed: int = 0, spanish: bool = False
) -> dict[str, str]:
    """The task's shards and held-out folder under `root` (generated unless complete); `spanish`: the
    `digits_es` names and captions."""
    images, labels = _scans()
    cut = len(images) - HELDOUT_SCANS
    names, templates = (NAMES_ES, TEMPLATES_ES) if spanish else (NAMES, TEMPLATES)
    return ensure_dataset(
        root,
        {"kind": "digits-es-v1" if spanish else "digits-v1"},
        sorted(names),
        _drawer(images[:cut], labels[:cut], names, templates),
        _drawer(images[cut:], labels[cut:], names, templates),
        n_train,
        n_heldout,
        per_shard=1000,
        seed=seed,
    )
