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


def load_checkpoint(path: str | Path, model: nn.Module, optimizer=None, scheduler=None) -> dict:
    """Restore model (and optimizer, scheduler) from a full-state checkpoint; returns the whole dict."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    set_model_state_dict(model, state["model"], options=opts)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=opts)
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    return state
