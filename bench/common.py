"""Shared by the benchmarks: where results go, and the paper's mix of image sizes."""

import json
import math
from pathlib import Path

import torch

from navit_clip.packing import fit_grid

RESULTS = Path(__file__).parent / "results"


def save_results(name: str, results: dict) -> Path:
    """Write bench/results/NAME.json (one flat object of figures and settings) and say so."""
    out = RESULTS / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote bench/results/{name}.json")
    return out


def load_results(name: str) -> dict | None:
    """What `save_results(name, ...)` last wrote, or None where nothing was."""
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def mixed_grids(
    n: int, seq_len: int, g: torch.Generator, patch_size: int = 16, max_side: int = 384
) -> list[tuple[int, int]]:
    """Patch grids of `n` images of the paper's contrastive mix: longer side ~ U(64, max_side) px, aspect
    ratio log-uniform in 1:3..3:1, shrunk (aspect kept) only if an image has more than `seq_len` patches."""
    side = torch.empty(n).uniform_(64, max_side, generator=g)
    aspect = torch.exp(torch.empty(n).uniform_(-math.log(3), math.log(3), generator=g))
    grids = []
    for s, a in zip(side.tolist(), aspect.tolist()):
        H, W = (s, s / a) if a >= 1 else (s * a, s)
        grids.append(fit_grid(round(H), round(W), patch_size, seq_len))
    return grids
