"""Checkpoints: one file per step, written atomically, the last k kept, loaded with weights_only.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed
(rename is atomic on POSIX), so a process killed mid-write leaves at most a *.tmp file, which
`latest_checkpoint` ignores. Model and optimizer states are gathered as full (unsharded) state
dicts, so DDP, FSDP2 and single-process runs read each other's checkpoints.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from navit_clip.config import saved_config, to_dict

log = logging.getLogger(__name__)
PATTERN = re.compile(r"step_(\d+)\.pt$")


def checkpoint_path(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"step_{step:08d}.pt"


def list_checkpoints(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(
        (p for p in folder.iterdir() if PATTERN.search(p.name)), key=lambda p: int(PATTERN.search(p.name)[1])
    )


def latest_checkpoint(folder: str | Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def remove_partial(folder: str | Path) -> list[Path]:
    """Delete the *.tmp files a run killed mid-write left behind (call once, on rank 0, at start)."""
    folder = Path(folder)
    found = sorted(folder.glob("step_*.pt.tmp")) if folder.is_dir() else []
    for p in found:
        p.unlink(missing_ok=True)
    if found:
        log.info("removed %d partial checkpoint file(s) left by an interrupted write", len(found))
    return found


def config_differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """`field: checkpoint A, config B` for every leaf that differs between two nested dicts."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for k in sorted(set(saved) | set(current)):
            out += config_differences(saved.get(k), current.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    if isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)):
        saved, current = list(saved), list(current)
    return [] if saved == current else [f"{prefix}: checkpoint {saved!r}, config {current!r}"]


def atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def save_checkpoint(
    folder: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    extra: dict,
    keep_last: int,
    is_main: bool,
) -> Path:
    """Gather full states (a collective: every rank calls this), rank 0 writes, older ones pruned."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = {
        "model": get_model_state_dict(model, options=opts),
        "optimizer": get_optimizer_state_dict(model, optimizer, options=opts),
        "scheduler": scheduler.state_dict(),
        "step": step,
        **extra,
    }
    path = checkpoint_path(folder, step)
    if is_main:
        Path(folder).mkdir(parents=True, exist_ok=True)
        atomic_save(state, path)
        for old in list_checkpoints(folder)[:-keep_last]:
            old.unlink(missing_ok=True)
    if dist.is_initialized():
        dist.barrier()
    return path


def load_checkpoint(
    path: str | Path, model: nn.Module, optimizer=None, scheduler=None, model_config: dict | None = None
) -> dict:
    """Restore model (and optimizer, scheduler) from a full-state checkpoint; returns the whole dict.

    With `model_config` (the run's resolved `model` section), a checkpoint saved with a different
    model is a ValueError that names the differing fields, before any weight is touched.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    # the saved tree with today's defaults filled in: a field added since is not a difference
    saved = to_dict(saved_config(state["config"]).model) if "config" in state else None
    if model_config is not None and saved is not None:
        diff = config_differences(saved, model_config, "model")
        if diff:
            raise ValueError(
                f"{path} was saved with a different model config; resume with the same model, or start "
                f"a new run folder. Differences:\n  " + "\n  ".join(diff)
            )
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    set_model_state_dict(model, state["model"], options=opts)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=opts)
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    return state


def load_weights(path: str | Path, model: nn.Module) -> None:
    """Model weights only, from a navit-clip checkpoint (model.init_from): every tensor must fit, or a
    ValueError names the first that does not."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path} holds no navit-clip model weights")
    weights, expected = state["model"], model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit the model: {len(missing)} missing tensor(s) {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}"
        )
    for name, t in weights.items():
        if t.shape != expected[name].shape:
            raise ValueError(
                f"{path}: {name} has shape {tuple(t.shape)}, the model's is {tuple(expected[name].shape)}"
            )
    model.load_state_dict(weights)
