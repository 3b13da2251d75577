"""Sharded checkpoints (train.checkpoint_format=sharded, torch.distributed.checkpoint): exact resume,
async writes, resharding to another world size and layout, consolidation, every reader, and faults
(a rank killed mid-save, a missing or truncated shard, another model's checkpoint), on real gloo ranks."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from dist_utils import run_world
from test_train import tiny_run

from navit_clip.checkpoint import COMPLETE, latest_checkpoint, list_checkpoints, read_checkpoint
from navit_clip.cli import main as cli
from navit_clip.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _train(shards, out, **extra):
    from navit_clip.train import train

    return train(load_config("configs/demo.yaml", tiny_run(shards, out, **extra)))


def _assert_same_state(got: dict, want: dict, what: str) -> None:
    """Two checkpoints' model and optimizer states, tensor for tensor, bit for bit."""
    assert got["model"].keys() == want["model"].keys(), what
    for k, t in want["model"].items():
        assert torch.equal(got["model"][k], t), (what, k)
    assert got["optimizer"]["state"].keys() == want["optimizer"]["state"].keys(), what
    for k, slots in want["optimizer"]["state"].items():
        for slot, t in slots.items():
            assert torch.equal(torch.as_tensor(got["optimizer"]["state"][k][slot]), torch.as_tensor(t)), (
                what,
                k,
                slot,
            )


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_sharded_run_resumes_exactly_and_every_reader_takes_its_step_folder(
    small_shards, tmp_path, asynchronous, capsys
):
    """One process: stopped at step 3 and resumed, a sharded (sync or async) run gives the unbroken
    run's losses; its step folder holds what the one-file checkpoint holds (consolidate: bit-equal),
    keep_last counts folders, and eval, export, wise-ft and model.init_from take the folder."""
    shards = small_shards["train"]
    fmt = {"train.checkpoint_format": "sharded", "train.async_checkpoint": str(asynchronous).lower()}
    full = _train(shards, tmp_path / "full", **{"train.keep_last": 5})  # one-file checkpoints: the reference
    first = _train(shards, tmp_path / "s", **fmt, **{"train.stop_at": 3})
    assert [p.name for p in list_checkpoints(tmp_path / "s")] == ["step_00000003"]
    step3 = tmp_path / "s" / "step_00000003"
    assert {".metadata", COMPLETE, "__0_0.distcp"} <= {p.name for p in step3.iterdir()}
    second = _train(shards, tmp_path / "s", **fmt, **{"train.resume": "latest", "train.keep_last": 1})
    assert first["losses"] + second["losses"] == full["losses"]
    assert [p.name for p in list_checkpoints(tmp_path / "s")] == ["step_00000006"]  # keep_last=1

    # consolidate: today's one-file checkpoint, bit-equal to the full-format run's at the same step
    out = tmp_path / "one.pt"
    assert cli(["consolidate", str(tmp_path / "s" / "step_00000006"), str(out)]) == 0
    mine = torch.load(out, weights_only=True)
    theirs = torch.load(tmp_path / "full" / "step_00000006.pt", weights_only=True)
    _assert_same_state(mine, theirs, "consolidated")
    for k in ("step", "data_batches", "data_epoch", "data_origin", "scheduler", "skip_counts"):
        assert mine[k] == theirs[k], k
    assert mine["config"]["model"] == theirs["config"]["model"]  # the runs differ in train.checkpoint_*

    # every reader takes the folder itself
    folder = str(tmp_path / "s" / "step_00000006")
    assert cli(["export", folder, str(tmp_path / "export"), "--no-onnx"]) == 0
    assert cli(["wise-ft", folder, str(out), str(tmp_path / "wise.pt"), "--alpha", "0.5"]) == 0
    assert torch.equal(
        torch.load(tmp_path / "wise.pt", weights_only=True)["model"]["logit_scale"],
        theirs["model"]["logit_scale"],
    )
    from navit_clip.factory import config_of, create_model

    assert config_of(folder).model.vision.width == 32
    for k, t in create_model(folder).state_dict().items():
        assert torch.equal(t, theirs["model"][k]), k
    tuned = _train(shards, tmp_path / "ft", **{"model.init_from": folder, "train.steps": 1})
    assert len(tuned["losses"]) == 1
    capsys.readouterr()


def test_faults_are_one_line_errors_naming_the_file_or_tensor(small_shards, tmp_path, capsys):
    """A missing or truncated shard, a folder whose write never finished, and another model's
    checkpoint: each refused in one line naming what is wrong, before any weight is touched."""
    shards = small_shards["train"]
    _train(shards, tmp_path / "s", **{"train.checkpoint_format": "sharded", "train.stop_at": 3})
    good = tmp_path / "s" / "step_00000003"

    def damaged(name, how):
        bad = tmp_path / name
        shutil.copytree(good, bad)
        how(bad)
        return bad

    missing = damaged("missing", lambda d: (d / "__0_0.distcp").unlink())
    truncated = damaged("truncated", lambda d: os.truncate(d / "__0_0.distcp", 100))
    unfinished = damaged("unfinished", lambda d: (d / COMPLETE).unlink())
    for bad, words in (
        (missing, "__0_0.distcp is missing"),
        (truncated, "__0_0.distcp is truncated (100 bytes"),
        (unfinished, "no COMPLETE marker"),
    ):
        capsys.readouterr()
        assert cli(["consolidate", str(bad), str(tmp_path / "x.pt")]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
        with pytest.raises(ValueError, match=words.replace("(", r"\(")):
            _train(shards, tmp_path / "r", **{"train.resume": str(bad), "train.checkpoint_format": "sharded"})
    with pytest.raises(ValueError, match=r"visual\.\S+ has shape .* in the checkpoint, .* in the model"):
        _train(
            shards,
            tmp_path / "s",
            **{"train.resume": "latest", "train.checkpoint_format": "sharded", "model.vision.width": 64},
        )
    assert latest_checkpoint(tmp_path / "s") == good  # nothing was written over it


def test_a_failed_background_write_stops_the_run_naming_the_folder(small_shards, tmp_path, monkeypatch):
    """train.async_checkpoint=true: a write that fails in the background (here: the disk refuses step
    3's shards) stops the run before its next save with an error naming the folder; nothing partial
    counts as a checkpoint."""
    import torch.distributed.checkpoint.filesystem as fs

    from navit_clip.checkpoint import CheckpointWriteError

    real = fs.FileSystemWriter.write_data

    def refusing(self, plan, planner):
        if "step_00000003" in str(self.path):
            raise OSError(28, "No space left on device")
        return real(self, plan, planner)

    monkeypatch.setattr(fs.FileSystemWriter, "write_data", refusing)
    with pytest.raises(CheckpointWriteError, match=r"step_00000003 failed .*No space left on device"):
        _train(small_shards["train"], tmp_path, **{"train.async_checkpoint": "true"})
    assert list_checkpoints(tmp_path) == []


def _reshard_on_rank(rank, world, shards, out, parallel, fmt, stop, resume, result):
    """A run on `world` gloo ranks with `parallel` (ddp / fsdp) and format `fmt`: trained to `stop`
    (0: the end), resumed from its latest checkpoint (`resume="latest"`), or only loaded from the
    checkpoint `resume` and read back whole (rank 0 saves the full state it loaded)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    from navit_clip import train as T
    from navit_clip.distributed import init_distributed

    common = {"train.parallel": parallel, "train.checkpoint_format": fmt}
    if not resume or resume == "latest":  # train (to `stop`, or on from the run's latest checkpoint)
        losses = _train(
            shards, out, **common, **{"train.stop_at": stop}, **({"train.resume": resume} if resume else {})
        )["losses"]
        if rank == 0:
            Path(result).write_text(json.dumps(losses))
        return
    cfg = load_config("configs/demo.yaml", tiny_run(shards, out, **common, **{"train.resume": resume}))
    info = init_distributed(cfg.train.device)
    run = T.build(cfg, info, T.resolve(cfg, info))
    state, data = T.resume(run)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    got = {
        "model": get_model_state_dict(run.model, options=opts),
        "optimizer": get_optimizer_state_dict(run.model, run.optimizer, options=opts),
        "step": state.step,
        "data": data,
    }
    if rank == 0:
        torch.save(got, result)


def test_a_checkpoint_of_two_fsdp2_ranks_resumes_exactly_and_reshards_to_any_world(small_shards, tmp_path):
    """Written by 2 FSDP2 ranks, sharded: resumed on 2 it continues bit-identically to the unbroken
    run; loaded on 3 FSDP2 ranks, 2 DDP ranks and one process, its weights and optimizer state are
    those the one-file format gathered at the same step."""
    shards = small_shards["train"]
    run_world(
        2, _reshard_on_rank, shards, str(tmp_path / "full"), "fsdp", "full", 0, "", str(tmp_path / "f.json")
    )
    run_world(
        2, _reshard_on_rank, shards, str(tmp_path / "s"), "fsdp", "sharded", 3, "", str(tmp_path / "a.json")
    )
    step3 = tmp_path / "s" / "step_00000003"
    assert {"__0_0.distcp", "__1_0.distcp"} <= {p.name for p in step3.iterdir()}  # each rank its shards
    run_world(
        2, _reshard_on_rank, shards, str(tmp_path / "s"), "fsdp", "sharded", 0, "latest", str(tmp_path / "x")
    )
    first = json.loads((tmp_path / "a.json").read_text())
    full = json.loads((tmp_path / "f.json").read_text())
    # the resumed half, read from the run's metrics.jsonl (one row per step, the resumed rows last)
    rows = [json.loads(r) for r in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    resumed = [r["loss"] for r in rows if r["step"] > 3]
    assert first == full[:3] and resumed == full[3:]
    want = torch.load(tmp_path / "full" / "step_00000003.pt", weights_only=True)
    for world, parallel in ((3, "fsdp"), (2, "ddp"), (1, "ddp")):
        got_path = tmp_path / f"got_{world}_{parallel}.pt"
        args = (
            shards,
            str(tmp_path / f"r{world}{parallel}"),
            parallel,
            "sharded",
            0,
            str(step3),
            str(got_path),
        )
        if world == 1:
            _reshard_on_rank(0, 1, *args)
        else:
            run_world(world, _reshard_on_rank, *args)
        got = torch.load(got_path, weights_only=True)
        assert got["step"] == 3 and got["data"]["world_size"] == 2
        _assert_same_state(got, want, f"{world} x {parallel}")


def _finite_on_rank(rank, world, shards, out, stop, keys_file):
    """A finite-data (data.resampled=false) FSDP2 run, sharded, trained to `stop` (0: on from its
    latest checkpoint to the end), writing the keys of every batch its trainer took, with the epoch."""
    from navit_clip import train as T

    real, taken = T.endless, []

    def spying(loader, dataset, info):
        for batch in real(loader, dataset, info):
            taken.append((dataset.epoch, [k for row in batch.keys for k in row if k]))
            yield batch

    T.endless = spying
    extra = {"train.stop_at": stop} if stop else {"train.resume": "latest"}
    _train(
        shards,
        out,
        **extra,
        **{
            "data.resampled": "false",
            "data.num_workers": 1,  # its prefetched batches are in flight at the save: not consumed
            "train.parallel": "fsdp",
            "train.checkpoint_format": "sharded",
            "train.steps": 25,
            "train.ckpt_every": 9,
        },
    )
    Path(f"{keys_file}.{rank}").write_text(json.dumps(taken))


def test_finite_data_resumed_on_another_world_reads_the_rest_of_each_epoch_once(small_shards, tmp_path):
    """2 FSDP2 ranks read 3 shards of finite data (rank 0 two, rank 1 one: rank 1 is an epoch ahead at
    the step-9 save) and stop there; 3 ranks resume from the sharded checkpoint. Over both runs every
    epoch the 3 ranks finished holds each of the 300 samples exactly once: nothing consumed is read
    again, nothing in flight (prefetched, unconsumed) is lost."""
    shards, out = small_shards["train"], tmp_path / "run"
    run_world(2, _finite_on_rank, shards, str(out), 9, str(tmp_path / "old"))
    saved = read_checkpoint(out / "step_00000009")["data_consumed"]
    assert saved["epoch"] == 0 and set(saved["consumed"]) == {0, 1}  # rank 1 was into epoch 1
    run_world(3, _finite_on_rank, shards, str(out), 0, str(tmp_path / "new"))
    old = [b for r in range(2) for b in json.loads((tmp_path / f"old.{r}").read_text())]
    new = [json.loads((tmp_path / f"new.{r}").read_text()) for r in range(3)]
    finished = min(max(e for e, _ in rank) for rank in new)  # every new rank is past the epochs before
    assert finished >= 2, "too few steps to finish two epochs on every new rank"
    every = {f"train{i:06d}" for i in range(300)}
    for epoch in range(finished):
        keys = [k for e, ks in old + [b for rank in new for b in rank] if e == epoch for k in ks]
        assert len(keys) == len(set(keys)) == 300 and set(keys) == every, epoch


KILL_ONE_RANK = textwrap.dedent("""
    # rank 1 dies (SIGKILL) while writing its shards of step 6's save; the other rank is left waiting
    import os, signal, sys
    import torch.distributed.checkpoint.filesystem as fs
    from navit_clip.config import load_config
    from navit_clip.train import train
    sys.path.insert(0, sys.argv[1])
    from test_train import tiny_run

    real = fs.FileSystemWriter.write_data
    def dying(self, plan, planner):
        if os.environ["RANK"] == "1" and "step_00000006" in str(self.path) and os.environ.get("KILL"):
            (self.path / "__1_0.distcp").write_bytes(b"half a shard")
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, plan, planner)
    fs.FileSystemWriter.write_data = dying
    train(load_config("configs/demo.yaml", tiny_run(sys.argv[2], sys.argv[3]) + sys.argv[4:]))
""")


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_rank_killed_during_a_save_leaves_the_previous_checkpoint_and_the_run_resumes(
    small_shards, tmp_path, asynchronous
):
    """torchrun, 2 gloo ranks, FSDP2: rank 1 is SIGKILLed mid-write of step 6 (sync or async save);
    step 3 stays the latest, the partial step 6 is removed at the next start, and the resumed run
    reads as the unbroken one."""
    shards = small_shards["train"]
    script = tmp_path / "kill.py"
    script.write_text(KILL_ONE_RANK)
    extra = [
        "train.parallel=fsdp",
        "train.checkpoint_format=sharded",
        f"train.async_checkpoint={str(asynchronous).lower()}",
        "train.steps=8",
        "train.keep_last=5",
    ]

    def launch(out, *more, kill=False):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "0"]
        # the checkout first on the path: the script runs from tmp_path, whatever the install points at
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **({"KILL": "1"} if kill else {})}
        args = [str(script), str(ROOT / "tests"), shards, str(out), *extra, *more]
        return subprocess.run([*cmd, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    killed = launch(tmp_path / "run", kill=True)
    assert killed.returncode != 0
    assert "SIGKILL" in killed.stderr or str(-signal.SIGKILL) in killed.stderr or "Signal 9" in killed.stderr
    partial = tmp_path / "run" / "step_00000006"
    assert partial.is_dir() and not (partial / COMPLETE).exists()
    assert latest_checkpoint(tmp_path / "run").name == "step_00000003"
    assert read_checkpoint(tmp_path / "run" / "step_00000003")["step"] == 3  # loadable
    resumed = launch(tmp_path / "run", "train.resume=latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (partial / COMPLETE).exists()  # the partial step 6 was removed at start and written anew
    unbroken = launch(tmp_path / "unbroken")
    assert unbroken.returncode == 0, unbroken.stderr[-3000:]

    def losses(folder):
        return [json.loads(r)["loss"] for r in (folder / "metrics.jsonl").read_text().splitlines()]

    assert losses(tmp_path / "run") == losses(tmp_path / "unbroken")
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == [
        "step_00000003",
        "step_00000006",
        "step_00000008",
    ]
