"""Run a function on W real gloo ranks (CPU processes) and surface any rank's failure."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    # a rank stuck in a collective fails the test in minutes instead of hanging it
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(minutes=3))
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_world(world: int, fn: Callable, *args) -> None:
    """Spawn `world` processes, each running fn(rank, world, *args) inside a gloo process group."""
    with tempfile.TemporaryDirectory():
        mp.spawn(_entry, args=(world, _free_port(), fn, args), nprocs=world, join=True)
