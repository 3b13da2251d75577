"""Shared by the conversion tests: open_clip models with every weight perturbed, and a seconds-long
fine-tune from a converted checkpoint."""

from __future__ import annotations

import torch


def perturbed(model: torch.nn.Module, std: float) -> torch.nn.Module:
    """`model` in eval mode with N(0, std) added to every weight (open_clip's inits leave zeros and
    ones, under which a wrong mapping of a bias or a norm could go unseen); seeded by the caller."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model.eval()


def finetune_overrides(shards: str, out, init, **extra) -> list[str]:
    """Dotted overrides of a 4-step run from `init` (model.init_from) on `shards`, checkpoints every 2
    steps into `out`, no evaluation; `extra` (section.key=value) adds to or replaces them."""
    overrides = {
        "demo": False,
        "data.shards": shards,
        "eval.shards": "''",
        "train.output_dir": str(out),
        "model.init_from": str(init),
        "data.batch_seqs": 2,
        "data.num_workers": 0,
        "data.resolution.kind": "side_sampling",
        "train.steps": 4,
        "train.warmup": 1,
        "train.ckpt_every": 2,
        "train.log_every": 1,
        **extra,
    }
    return [f"{k}={v}" for k, v in overrides.items()]
