"""Weight-space ensembling of a fine-tuned model with the checkpoint it started from (WiSE-FT,
Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022):

    theta = (1 - alpha) * theta_start + alpha * theta_finetuned

    navit-clip wise-ft converted.pt runs/finetune/step_00002000.pt wise_0.5.pt --alpha 0.5

alpha = 0 is the starting checkpoint, 1 the fine-tuned one; in between, a model that keeps much of the
start's accuracy where fine-tuning lost it (its own resolution, other tasks) and much of what the
fine-tune gained. The result is a weights-only navit-clip checkpoint with the fine-tuned run's config:
it evaluates, exports and fine-tunes (model.init_from) like any other.
"""

from __future__ import annotations

from pathlib import Path

import torch

from navit_clip.checkpoint import atomic_save, config_differences, read_checkpoint
from navit_clip.config import migrate


def _read(path: str | Path, which: str) -> dict:
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{which} checkpoint {path} does not exist")
    state = read_checkpoint(path)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"{which} {path} is not a navit-clip checkpoint (model weights and config)")
    return state


# model fields that say how a run trained, not what the weights compute
RUN_ONLY = ("init_from", "attn_backend", "lock", "lock_unlocked_groups", "lock_norms")


def _architecture(config: dict) -> dict:
    """The model section of a saved config without the run's own choices (RUN_ONLY)."""

    def strip(tree):
        if isinstance(tree, dict):
            return {k: strip(v) for k, v in tree.items() if k not in RUN_ONLY}
        return tree

    return strip(migrate(config)["model"])


def wise_ft(start: str | Path, finetuned: str | Path, out: str | Path, alpha: float) -> Path:
    """Write (1 - alpha) * START + alpha * FINETUNED to OUT (a weights-only checkpoint, atomically).
    Both must be navit-clip checkpoints of one architecture; alpha in [0, 1]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--alpha {alpha} must be within [0, 1] (0: the start, 1: the fine-tuned model)")
    a, b = _read(start, "start"), _read(finetuned, "fine-tuned")
    differ = config_differences(_architecture(a["config"]), _architecture(b["config"]), "model")
    if differ:
        raise ValueError(
            f"{start} and {finetuned} are not one architecture: {'; '.join(differ[:3])} (first of {len(differ)})"
        )
    wa, wb = a["model"], b["model"]
    if set(wa) != set(wb) or any(wa[k].shape != wb[k].shape for k in wa):
        raise ValueError(f"{start} and {finetuned} hold different tensors; they are not one model")
    mixed = {
        k: torch.lerp(wa[k].float(), wb[k].float(), alpha).to(wb[k].dtype)
        if wb[k].is_floating_point()
        else wb[k]
        for k in wb
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    source = {"wise_ft": {"start": str(start), "finetuned": str(finetuned), "alpha": alpha}}
    atomic_save({"model": mixed, "config": b["config"], "step": b.get("step", 0), "source": source}, out)
    return out
