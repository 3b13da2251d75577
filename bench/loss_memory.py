"""Memory and time of the chunked ring CLIP loss vs open_clip's ClipLoss(local_loss, gather_with_grad).

World sizes 2, 4 and 8 (gloo on CPU, one thread per rank), 1024 valid slots per rank, D = 256 and
512. Per rank and per method:
    saved   bytes of the distinct tensors autograd saves for backward (saved_tensors_hooks), the
            embeddings included;
    peak    the rise of the process's peak resident memory over one forward+backward (VmHWM after
            /proc/self/clear_refs; glibc is told to return large blocks to the OS at once);
    time    median seconds per forward+backward over REPEATS repetitions, ours and open_clip's
            alternating (A B A B ...: drift and other load fall on both alike), with the spread
            (min..max) of each and of the per-pair ratio ours / peer.
Figures are the maximum over ranks (memory) and rank 0's timings (time). Memory and time are measured
in separate processes: the peak-memory reading needs glibc to hand every freed block of 64 KiB or more
back to the OS at once (MALLOC_MMAP_THRESHOLD_), which makes every large allocation a fresh mmap with
its page faults; a training process runs with the default allocator, so time is taken with it (until
the sixteenth round both were taken under the memory setting, which charged each side its
allocations' page faults: 1.1-1.2x where the default allocator reads 0.7-0.95x, bench/NOTES.md).

    python bench/loss_memory.py     -> bench/results/loss_memory.json
"""

import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from common import save_results

B_LOCAL, REPEATS, TILE = 1024, 15, 1024


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _measure(fn):
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark
    rss0 = _status_kb("VmRSS")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    peak = (_status_kb("VmHWM") - rss0) * 1024
    return sum(storages.values()), peak


def _rank(rank: int, world: int, port: int, dims: list[int], out_path: str, part: str) -> None:
    """One rank of one part: `memory` (saved bytes and peak RSS) or `time` (alternating repetitions)."""
    from open_clip.loss import ClipLoss

    from navit_clip.loss import clip_loss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    peer_loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    results = {}
    for D in dims:
        g = torch.Generator().manual_seed(rank)
        I0 = F.normalize(torch.randn(B_LOCAL, D, generator=g), dim=-1)
        T0 = F.normalize(torch.randn(B_LOCAL, D, generator=g), dim=-1)
        steps = {}
        for name in ("ours", "peer"):

            def step(I0=I0, T0=T0, name=name):
                I, T = I0.clone().requires_grad_(), T0.clone().requires_grad_()
                t = torch.tensor(2.0, requires_grad=True)
                if name == "ours":
                    return clip_loss(I, T, None, t, tile_size=TILE)
                return peer_loss(I, T, t.exp())

            step().backward()  # warm-up
            dist.barrier()
            steps[name] = step
            if part == "memory":
                results[f"{name}_{D}"] = dict(zip(("saved", "peak"), _measure(step)))
        if part == "time":
            times = {"ours": [], "peer": []}
            for _ in range(REPEATS):  # alternating: whatever else loads the machine falls on both
                for name in ("ours", "peer"):
                    dist.barrier()
                    t0 = time.perf_counter()
                    steps[name]().backward()
                    times[name].append(time.perf_counter() - t0)
            pairs = [a / b for a, b in zip(times["ours"], times["peer"])]
            for name in ("ours", "peer"):
                results[f"{name}_{D}"] = {
                    "time": statistics.median(times[name]),
                    "time_min": min(times[name]),
                    "time_max": max(times[name]),
                    "ratio_median": statistics.median(pairs),
                    "ratio_min": min(pairs),
                    "ratio_max": max(pairs),
                }
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        if part == "memory":  # the most any rank needed
            results = {k: {f: max(r[k][f] for r in gathered) for f in ("saved", "peak")} for k in results}
        Path(out_path).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def _run(world: int, dims: list[int], part: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        mp.spawn(_rank, args=(world, _free_port(), dims, f.name, part), nprocs=world, join=True)
        return json.loads(Path(f.name).read_text())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    worlds = [int(w) for w in sys.argv[1:]] or [2, 4, 8]
    dims = [256, 512]
    results = {
        "slots_per_rank": B_LOCAL,
        "tile_size": TILE,
        "repeats": REPEATS,
        "threads_per_rank": 1,
        "cpu_cores": os.cpu_count(),
    }
    for W in worlds:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # large blocks go back to the OS when freed
        memory = _run(W, dims, "memory")
        del os.environ["MALLOC_MMAP_THRESHOLD_"]  # time with the allocator a training process has
        timed = _run(W, dims, "time")
        for D in dims:
            ours, peer = memory[f"ours_{D}"] | timed[f"ours_{D}"], memory[f"peer_{D}"] | timed[f"peer_{D}"]
            sfx = f"w{W}" if D == 256 else f"w{W}_d{D}"
            results[f"saved_memory_ours_bytes_{sfx}"] = ours["saved"]
            results[f"saved_memory_peer_bytes_{sfx}"] = peer["saved"]
            results[f"peak_memory_ours_bytes_{sfx}"] = ours["peak"]
            results[f"peak_memory_peer_bytes_{sfx}"] = peer["peak"]
            results[f"time_ours_s_{sfx}"] = ours["time"]
            results[f"time_peer_s_{sfx}"] = peer["time"]
            results[f"ratio_saved_memory_peer_over_ours_{sfx}"] = peer["saved"] / ours["saved"]
            results[f"ratio_peak_memory_peer_over_ours_{sfx}"] = peer["peak"] / max(ours["peak"], 1)
            results[f"ratio_time_ours_over_peer_{sfx}"] = ours["time"] / peer["time"]
            results[f"ratio_time_ours_over_peer_pairs_min_{sfx}"] = ours["ratio_min"]
            results[f"ratio_time_ours_over_peer_pairs_max_{sfx}"] = ours["ratio_max"]
            for side, fig in (("ours", ours), ("peer", peer)):
                results[f"time_{side}_s_min_{sfx}"] = fig["time_min"]
                results[f"time_{side}_s_max_{sfx}"] = fig["time_max"]
            print(
                f"W={W} D={D}: saved ours {ours['saved'] / 2**20:6.1f} MiB peer {peer['saved'] / 2**20:6.1f} MiB "
                f"(peer/ours {peer['saved'] / ours['saved']:5.1f}x) | peak ours {ours['peak'] / 2**20:6.1f} MiB "
                f"peer {peer['peak'] / 2**20:6.1f} MiB | time (median of {REPEATS}, min..max) ours "
                f"{ours['time']:.3f}s ({ours['time_min']:.3f}..{ours['time_max']:.3f}) peer {peer['time']:.3f}s "
                f"({peer['time_min']:.3f}..{peer['time_max']:.3f}), ours/peer {ours['time'] / peer['time']:.2f}x "
                f"(pairs {ours['ratio_min']:.2f}..{ours['ratio_max']:.2f})",
                flush=True,
            )
    save_results("loss_memory", results)


if __name__ == "__main__":
    main()
