"""Process group setup and model wrapping (DDP or FSDP2), on stable torch.distributed APIs.

The same script runs as one plain process (no group) or under torchrun (env:// rendezvous): NCCL
when CUDA is used, gloo on CPU. Wrapping is applied from outside the model.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if WORLD_SIZE > 1 (or one already exists); pick the device."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but no CUDA device is visible; use train.device=cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)
    return DistInfo(device=dev)


def parallelize(model: nn.Module, tc, info: DistInfo) -> nn.Module:
    """Everything that changes how the model runs, in one place and in this order (torchtitan's):
    1. activation checkpointing on every transformer block (`torch.utils.checkpoint` inside the
       block's forward: parameter names, and so checkpoints, are unchanged);
    2. `torch.compile` of the blocks' MLPs (most of the FLOPs; attention stays eager, since its
       packing plan changes every batch and would recompile);
    3. DDP or FSDP2 (`wrap_model`), under torchrun.
    Returns the module to call for training (the model itself in one process)."""
    for block in transformer_blocks(model):
        block.checkpointing = tc.activation_checkpointing
        if tc.compile:
            block.mlp.compile(dynamic=True)
    return wrap_model(model, info, tc.parallel)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every transformer block of both towers: the unit of activation checkpointing, compile and FSDP."""
    return [block for tower in (model.visual, model.text) for block in tower.blocks]


def wrap_model(model: nn.Module, info: DistInfo, parallel: str = "ddp") -> nn.Module:
    """DDP, or FSDP2 (`fully_shard` on every transformer block, then the root).

    Under FSDP2 every forward, encode_* included, is a collective: all ranks must make the same calls
    (evaluation keeps them in step, see zeroshot.lockstep)."""
    if not info.distributed:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        # Text of empty slots is never encoded, but every parameter is used in every step.
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for block in transformer_blocks(model):
        fully_shard(block)
    fully_shard(model)
    # evaluation calls these, not forward: FSDP must gather the root's parameters for them too
    for method in ("encode_packed", "encode_image", "encode_text"):
        register_fsdp_forward_method(model, method)
    return model


def all_reduce_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Average scalar metrics over ranks (one small collective)."""
    if not info.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return {k: float(v) / info.world_size for k, v in zip(keys, t.tolist())}


def all_gather_objects(obj, info: DistInfo) -> list:
    """Every rank's `obj` (small, picklable), in rank order; [obj] in one process."""
    if not info.distributed:
        return [obj]
    gathered: list = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def sum_counts(counts: dict[str, int], info: DistInfo) -> dict[str, int]:
    """Sum integer counters over ranks; ranks may hold different keys (one small object gather)."""
    total: dict[str, int] = {}
    for part in all_gather_objects(dict(counts), info):
        for k, v in part.items():
            total[k] = total.get(k, 0) + v
    return total
