"""Run a function on W real gloo ranks (CPU processes) and surface any rank's failure."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, store: str, fn: Callable, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    # Rendezvous through a file, not a picked port: a free port found by the parent can be taken by
    # another process before rank 0 binds it (a test failed that way once).
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(minutes=3)
    )  # a rank stuck in a collective fails the test in minutes instead of hanging it
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Done and clean: leave without the interpreter's teardown. A spawned child otherwise runs C++
    # static destructors, and once in a full-suite run both ranks of a passing 2-rank test died there
    # ("terminate called without an active exception", SIGABRT) after their work had succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_world(world: int, fn: Callable, *args) -> None:
    """Spawn `world` processes, each running fn(rank, world, *args) inside a gloo process group."""
    with tempfile.TemporaryDirectory() as folder:
        store = os.path.join(folder, "rendezvous")
        mp.spawn(_entry, args=(world, store, fn, args), nprocs=world, join=True)
