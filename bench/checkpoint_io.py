"""What a checkpoint costs the run: the time a save blocks training, and rank 0's memory, full vs sharded.

On W gloo ranks (CPU processes) under FSDP2, the model of configs/SIZE.yaml (B/16, L/16: both towers)
with AdamW state (one step taken), each save mode in fresh processes:
  full           today's path, and open_clip_train's: the full model and optimizer state gathered onto
                 rank 0 (get_*_state_dict(full_state_dict, cpu_offload)), one atomic torch.save there;
  sharded        train.checkpoint_format=sharded: dcp.save, every rank writing its own shards;
  sharded_async  train.async_checkpoint=true: dcp.async_save, the state staged to CPU in the call and
                 written by a background thread; `blocked_s` is the staging, `done_s` the write's end.
Per mode: the seconds the save call blocks the training loop (the slowest rank's), the seconds until
the checkpoint is complete, rank 0's peak resident memory over the save beyond what it held before
(sampled from /proc every 5 ms), and the bytes on disk. Ratios are against `full` in the same run.

    python bench/checkpoint_io.py                      # B/16 and L/16 on 2 ranks, B/16 on 4
    python bench/checkpoint_io.py --sizes b16 --ranks 2
Writes bench/results/checkpoint_io.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import save_results

ROOT = Path(__file__).resolve().parents[1]
MODES = ("full", "sharded", "sharded_async")


class _PeakRSS:
    """Rank 0's resident memory over the save, sampled every 5 ms from /proc (getrusage's maxrss is the
    whole process's high-water mark, the model's construction included, so it can hide the save)."""

    def __init__(self) -> None:
        self.page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20
        self.before = self.peak = self._now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _now(self) -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page_mb

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._now())

    def extra_mb(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self._now()) - self.before


def _worker(rank: int, world: int, store: str, size: str, mode: str, folder: str, result: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(minutes=30)
    )
    from navit_clip.checkpoint import ShardedCheckpointer, save_checkpoint
    from navit_clip.config import load_config
    from navit_clip.distributed import DistInfo, wrap_model
    from navit_clip.model.clip import NaViTCLIP
    from navit_clip.train import make_optimizer, warmup_cosine

    cfg = load_config(ROOT / "configs" / f"{size}.yaml", ["model.text.vocab_size=49408"])
    torch.manual_seed(0)
    model = NaViTCLIP(cfg.model)
    params = sum(p.numel() for p in model.parameters())
    wrap_model(model, DistInfo(rank, world, 0, torch.device("cpu")), "fsdp")
    opt = make_optimizer(model, cfg.train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(10, 100, 0.0))
    for p in model.parameters():  # one step: AdamW's moments exist, as in a run
        p.grad = torch.zeros_like(p)
    opt.step()
    sharded = ShardedCheckpointer(folder, keep_last=2, asynchronous=mode == "sharded_async")
    dist.barrier()
    rss = _PeakRSS()
    t0 = time.perf_counter()
    if mode == "full":
        extra = {"config": {}, "rng": {"torch": torch.get_rng_state()}}
        save_checkpoint(folder, 1, model, opt, sched, extra, 2, rank == 0)
        blocked = time.perf_counter() - t0
    else:
        sharded.save(
            1,
            model,
            opt,
            {"scheduler": sched.state_dict(), "step": 1, "config": {}},
            {"rng": {"torch": torch.get_rng_state()}},
        )
        blocked = time.perf_counter() - t0
        sharded.wait()
    done = time.perf_counter() - t0
    peak = rss.extra_mb()
    times = [None] * world
    dist.all_gather_object(times, (blocked, done))
    if rank == 0:
        disk = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
        Path(result).write_text(
            json.dumps(
                {
                    "size": size,
                    "ranks": world,
                    "mode": mode,
                    "params_M": round(params / 1e6, 1),
                    "blocked_s": round(max(b for b, _ in times), 2),
                    "done_s": round(max(d for _, d in times), 2),
                    "rank0_peak_extra_MB": round(peak),
                    "disk_MB": round(disk / 2**20),
                }
            )
        )
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def measure(size: str, world: int, mode: str) -> dict:
    with tempfile.TemporaryDirectory(dir=os.environ.get("CKPT_BENCH_DIR")) as tmp:
        folder, result = os.path.join(tmp, "ckpt"), os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(world, os.path.join(tmp, "store"), size, mode, folder, result), nprocs=world)
        row = json.loads(Path(result).read_text())
        shutil.rmtree(folder, ignore_errors=True)
    print(
        f"{size} x {world} ranks {mode:>14}: blocks {row['blocked_s']:6.2f} s, complete {row['done_s']:6.2f} s, "
        f"rank 0 peak +{row['rank0_peak_extra_MB']} MB, {row['disk_MB']} MB on disk",
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["b16", "l16"])
    ap.add_argument("--ranks", nargs="+", type=int, default=[2, 4])
    ap.add_argument(
        "--max-l16-ranks", type=int, default=2, help="L/16 runs on at most this many ranks (memory)"
    )
    args = ap.parse_args()
    rows, results = [], {}
    for size in args.sizes:
        for world in args.ranks:
            if size == "l16" and world > args.max_l16_ranks:
                continue
            group = {mode: measure(size, world, mode) for mode in MODES}
            rows += group.values()
            full = group["full"]
            for mode in MODES[1:]:
                r = group[mode]
                ratio_block = full["blocked_s"] / max(r["blocked_s"], 1e-9)
                ratio_mem = full["rank0_peak_extra_MB"] / max(r["rank0_peak_extra_MB"], 1)
                print(
                    f"  {size} x {world} {mode}: the save blocks {ratio_block:.1f}x less than full, "
                    f"rank 0's extra peak {ratio_mem:.1f}x smaller"
                )
                results[f"ratio_blocked_s_full_over_{mode}_{size}_{world}ranks"] = round(ratio_block, 2)
                results[f"ratio_rank0_peak_full_over_{mode}_{size}_{world}ranks"] = round(ratio_mem, 2)
    save_results("checkpoint_io", {"rows": rows, **results, "torch": torch.__version__})


if __name__ == "__main__":
    main()
