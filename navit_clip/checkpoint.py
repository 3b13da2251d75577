"""Checkpoints, in two formats, written so that a killed run never leaves a loadable half of one.

full: one file per step (step_N.pt), the model and optimizer gathered as full (unsharded) state dicts
onto rank 0, written to a temporary file, flushed, then renamed (atomic on POSIX): a process killed
mid-write leaves at most a *.tmp file, which the listing ignores. DDP, FSDP2 and one-process runs read
each other's files.

sharded: one folder per step (step_N/), written by torch.distributed.checkpoint (DCP): every rank
writes its own shards of the model and optimizer (`__R_K.distcp`), DCP's coordinator writes the
`.metadata` index last, and then rank 0 writes our `COMPLETE` marker. A folder counts only with both;
anything else is a partial write: ignored by the listing and by `keep_last`, removed at the next start.
DCP reshards on load, so a folder written by N ranks loads on M (FSDP2, DDP or one process). The
training state beside the weights (schedule, step, config; each rank's RNG and data-stream position)
rides in the same folder as small byte tensors (`_pack`), so one DCP call writes everything.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import threading
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from navit_clip.config import saved_config, to_dict

log = logging.getLogger(__name__)
PATTERN = re.compile(r"step_(\d+)(\.pt)?$")
COMPLETE = "COMPLETE"  # rank 0 writes it into a step folder once DCP's .metadata is written


def checkpoint_path(folder: str | Path, step: int, sharded: bool = False) -> Path:
    return Path(folder) / (f"step_{step:08d}" if sharded else f"step_{step:08d}.pt")


def is_sharded(path: str | Path) -> bool:
    """A sharded checkpoint (a step folder) rather than a one-file one."""
    return Path(path).is_dir()


def is_complete(path: Path) -> bool:
    """A step file, or a step folder holding DCP's metadata and our marker."""
    if path.is_dir():
        return (path / ".metadata").is_file() and (path / COMPLETE).is_file()
    return path.is_file()


def _step_of(path: Path) -> int:
    return int(PATTERN.search(path.name)[1])


def list_checkpoints(folder: str | Path) -> list[Path]:
    """The complete checkpoints in `folder`, both formats, oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = (p for p in folder.iterdir() if PATTERN.search(p.name) and is_complete(p))
    return sorted(found, key=lambda p: (_step_of(p), p.is_dir()))


def latest_checkpoint(folder: str | Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def remove_partial(folder: str | Path) -> list[Path]:
    """Delete what a run killed mid-write left behind: *.tmp files and step folders without their
    marker (call once, on rank 0, at start, before any save of this run)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = sorted(folder.glob("step_*.pt.tmp")) + sorted(
        p for p in folder.iterdir() if p.is_dir() and PATTERN.search(p.name) and not is_complete(p)
    )
    for p in found:
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    if found:
        log.info(
            "removed %d partial checkpoint(s) left by an interrupted write: %s",
            len(found),
            ", ".join(p.name for p in found),
        )
    return found


def prune(folder: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (rank 0)."""
    for old in list_checkpoints(folder)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


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
    """The full format: gather full states (a collective: every rank calls this), rank 0 writes,
    older ones pruned."""
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
        prune(folder, keep_last)
    if dist.is_initialized():
        dist.barrier()
    return path


# -- the sharded format (torch.distributed.checkpoint) ------------------------------------------------
def _pack(obj: Any) -> torch.Tensor:
    """Small Python state (schedule, RNG, positions) as a byte tensor DCP stores like any other."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def _unpack(t: torch.Tensor) -> Any:
    return torch.load(io.BytesIO(t.numpy().tobytes()), map_location="cpu", weights_only=True)


@contextlib.contextmanager
def _one_process_quietly():
    """DCP warns that it assumes one process whenever no group is up: here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _rank_key(rank: int) -> str:
    return f"rank_{rank}"


def _one_line(e: BaseException) -> str:
    """An error in one line; DCP's CheckpointException by its first rank's cause, not its tracebacks."""
    if isinstance(e, CheckpointException) and e.failures:
        rank, (cause, _) = next(iter(sorted(e.failures.items())))
        return f"rank {rank}: {type(cause).__name__}: {cause}"
    return f"{type(e).__name__}: {e}"


class CheckpointWriteError(RuntimeError):
    """A background (async) checkpoint write failed: the run stops before its next save."""


class ShardedCheckpointer:
    """Writes step folders with DCP, every rank its own shards; with `asynchronous`, the state is
    staged (copied to CPU memory) in the step and written by a background thread (dcp.async_save),
    over a gloo group of its own so that its collectives never interleave with training's. The next
    save, `wait` and the end of the run wait for the last write; a failed one raises
    CheckpointWriteError naming the folder. A collective: every rank makes the same calls."""

    def __init__(self, folder: str | Path, keep_last: int, asynchronous: bool = False):
        self.folder, self.keep_last, self.asynchronous = Path(folder), keep_last, asynchronous
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        # async_save needs a CPU backend, and a group training never uses
        self.group = dist.new_group(backend="gloo") if asynchronous and self.distributed else None
        self.pending: tuple[Future, Path, threading.Event] | None = None

    def save(self, step: int, model: nn.Module, optimizer, shared: dict, own: dict) -> Path:
        """Write step `step`: model and optimizer shards, `shared` (rank 0's: schedule, step, config)
        and `own` (this rank's RNG and data position). Returns the step folder."""
        self.wait()  # one write at a time: the previous one must be done (and its error raised)
        path = checkpoint_path(self.folder, step, sharded=True)
        if self.rank == 0:
            (path / COMPLETE).unlink(missing_ok=True)  # rewriting a step: it is partial until done
        state = {
            "model": get_model_state_dict(model),
            "optimizer": get_optimizer_state_dict(model, optimizer),
            _rank_key(self.rank): _pack(own),
        }
        if self.rank == 0:
            state["train"] = _pack({**shared, "world_size": self.world})
        if self.asynchronous:
            with _one_process_quietly():
                future = dcp.async_save(
                    state, checkpoint_id=path, process_group=self.group, no_dist=not self.distributed
                )
            finished = threading.Event()  # rank 0: the marker is written (or the write failed)

            def finish(f: Future) -> None:
                try:
                    if f.exception() is None:
                        self._finish(path, step)
                finally:
                    finished.set()

            if self.rank == 0:  # the coordinator's future ends after every rank's shards and .metadata
                future.add_done_callback(finish)
            else:
                finished.set()
            self.pending = (future, path, finished)
        else:
            with _one_process_quietly():
                dcp.save(state, checkpoint_id=path, no_dist=not self.distributed)
            if self.rank == 0:
                self._finish(path, step)
        return path

    def _finish(self, path: Path, step: int) -> None:
        """Rank 0, once DCP's .metadata is written: the marker (atomically), then pruning."""
        tmp = path / (COMPLETE + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"step": step, "world_size": self.world}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path / COMPLETE)
        prune(self.folder, self.keep_last)

    def failed(self) -> bool:
        """Whether the background write has ended in an error (cheap: call it every step)."""
        return bool(self.pending and self.pending[0].done() and self.pending[0].exception())

    def wait(self) -> None:
        """Block until the background write is done; raise CheckpointWriteError if it failed."""
        if self.pending is None:
            return
        future, path, finished = self.pending
        self.pending = None
        try:
            future.result()
            finished.wait()  # a future's callbacks run after its waiters wake: the marker too
        except (Exception, CheckpointException) as e:  # DCP's own is a BaseException
            raise CheckpointWriteError(
                f"the background checkpoint write to {path} failed ({_one_line(e)}); the run stopped "
                f"before its next save. Its last complete checkpoint is "
                f"{latest_checkpoint(self.folder) or 'none'}: resume from it with --resume latest"
            ) from e
        if self.distributed:  # every rank's write is done before anyone goes on (or exits)
            dist.barrier(group=self.group)


def check_files(path: Path) -> dcp.metadata.Metadata:
    """A step folder's metadata, after checking that every shard file it names is there and long
    enough: a missing or truncated file is a ValueError naming it (one line)."""
    if not (path / ".metadata").is_file():
        raise ValueError(f"{path} is no complete sharded checkpoint: it has no .metadata (a partial write)")
    if not (path / COMPLETE).is_file():
        raise ValueError(
            f"{path} is no complete sharded checkpoint: it has no {COMPLETE} marker (a write that never "
            "finished); resume from an earlier step"
        )
    try:
        md = dcp.FileSystemReader(path).read_metadata()
    except Exception as e:
        raise ValueError(
            f"{path / '.metadata'} is unreadable ({type(e).__name__}): a damaged checkpoint"
        ) from None
    need: dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        f = path / name
        if not f.is_file():
            raise ValueError(f"{f} is missing: the sharded checkpoint {path} is incomplete")
        if f.stat().st_size < size:
            raise ValueError(
                f"{f} is truncated ({f.stat().st_size} bytes, its checkpoint's metadata needs {size})"
            )
    return md


def _shape_problem(path: Path, md, model_state: dict) -> str:
    """The first tensor that does not fit the model (the model's order), or ''."""
    saved = {k[len("model.") :]: v for k, v in md.state_dict_metadata.items() if k.startswith("model.")}
    for name, t in model_state.items():
        if name not in saved:
            return f"{path} does not fit the model: it has no tensor {name}"
        if tuple(saved[name].size) != tuple(t.shape):
            return (
                f"{path} does not fit the model: {name} has shape {tuple(saved[name].size)} in the "
                f"checkpoint, {tuple(t.shape)} in the model"
            )
    extra = sorted(set(saved) - set(model_state))
    return f"{path} does not fit the model: the model has no tensor {extra[0]}" if extra else ""


def _small_state(path: Path, md, rank: int) -> dict:
    """The shared training state and this rank's own (rank 0's when this rank is new: more ranks
    than wrote the checkpoint), as one flat dict like a full checkpoint's."""
    keys = md.state_dict_metadata
    own = _rank_key(rank) if _rank_key(rank) in keys else _rank_key(0)
    state = {k: torch.empty(tuple(keys[k].size), dtype=torch.uint8) for k in ("train", own)}
    with _one_process_quietly():
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    return {**_unpack(state["train"]), **_unpack(state[own])}


def _refuse_other_model(path: Path, config: dict | None, model_config: dict | None) -> None:
    """A ValueError naming every model field the checkpoint's config (with today's defaults filled
    in: a field added since is no difference) states differently from the run's."""
    saved = to_dict(saved_config(config).model) if config else None
    if model_config is not None and saved is not None:
        diff = config_differences(saved, model_config, "model")
        if diff:
            raise ValueError(
                f"{path} was saved with a different model config; resume with the same model, or start "
                f"a new run folder. Differences:\n  " + "\n  ".join(diff)
            )


def load_sharded(
    path: str | Path, model: nn.Module, optimizer=None, scheduler=None, model_config: dict | None = None
) -> dict:
    """Restore a step folder into a model laid out however this run lays it out (FSDP2, DDP or one
    process, any number of ranks): DCP reshards. Returns the training state as load_checkpoint does."""
    path = Path(path)
    md = check_files(path)
    rank = dist.get_rank() if dist.is_initialized() else 0
    small = _small_state(path, md, rank)
    model_state = get_model_state_dict(model)
    problem = _shape_problem(path, md, model_state)
    if problem:  # the first differing tensor, with the config fields that made it, in one line
        saved = small.get("config")
        diff = (
            config_differences(to_dict(saved_config(saved).model), model_config, "model")
            if saved and model_config
            else []
        )
        raise ValueError(problem + (f" (config: {'; '.join(diff)})" if diff else ""))
    _refuse_other_model(path, small.get("config"), model_config)
    state = {"model": model_state}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    with _one_process_quietly():
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(small["scheduler"])
    return small


def read_checkpoint(path: str | Path, parts: tuple[str, ...] = ("model",)) -> dict:
    """A checkpoint of either format, read whole into this process (no process group): a full
    file's dict, or a step folder's with the same keys (`parts`: which of model / optimizer to read;
    the training state and config always). For eval, export, wise-ft, model.init_from, consolidate."""
    path = Path(path)
    if not path.is_dir():
        return torch.load(path, map_location="cpu", weights_only=True)
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    check_files(path)
    keys = {"train", _rank_key(0), *parts}
    state: dict = {}
    # what torch's own dcp_to_torch_save does, for the keys asked: the state dict is built from the
    # metadata (full tensors, unflattened) in this one process
    with _one_process_quietly():
        _load_state_dict(
            state,
            storage_reader=dcp.FileSystemReader(path),
            planner=_EmptyStateDictLoadPlanner(keys=keys),
            no_dist=True,
        )
    if "train" not in state:
        raise ValueError(f"{path} is a DCP checkpoint but not navit-clip's (it holds no training state)")
    return {
        **{k: state[k] for k in parts if k in state},
        **_unpack(state["train"]),
        **_unpack(state[_rank_key(0)]),
    }


def consolidate(step_dir: str | Path, out: str | Path) -> Path:
    """A step folder as today's one-file checkpoint (model, optimizer, schedule and rank 0's state):
    what `navit-clip consolidate` writes. Reads everything into this one process."""
    state = read_checkpoint(step_dir, parts=("model", "optimizer"))
    state.pop("world_size", None)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(state, out)
    return out


def load_checkpoint(
    path: str | Path, model: nn.Module, optimizer=None, scheduler=None, model_config: dict | None = None
) -> dict:
    """Restore model (and optimizer, scheduler) from a checkpoint of either format; returns its
    training state (step, data position, RNG, config...).

    With `model_config` (the run's resolved `model` section), a checkpoint saved with a different
    model is a ValueError that names the differing fields, before any weight is touched.
    """
    if is_sharded(path):
        return load_sharded(path, model, optimizer, scheduler, model_config)
    state = torch.load(path, map_location="cpu", weights_only=True)
    _refuse_other_model(Path(path), state.get("config"), model_config)
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
    state = read_checkpoint(path)
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
