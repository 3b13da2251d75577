"""The loss's traffic: the flat ring against the two-level (hierarchical) ring, measured and modelled.

Measured here: 8 gloo processes on this machine, as one ring of 8 ("1 x 8", today's topology) and as
2 nodes x 4 (hierarchical), each rank with b = 256 slots of D = 512: the bytes each rank sends and
receives a step (forward and backward), split by link (intra-node / inter-node; the flat ring is
counted as if it spanned 2 nodes of 4: its hops then wait on an inter-node link at every step), the
sequential hops, and the time of a step. All "nodes" here are one machine and loopback, so the time
shows the topology's own overhead, not a network's latency: the model below is where that shows.
Also measured: the error that `comm_dtype=bf16` adds at a late-training temperature (s = 95),
against a float64 reference, and its effect on the loss of the flat ring.

Modelled: R = 8 ... 1024 ranks in nodes of 8, b = 256, D = 512, per rank and step: bytes and hops
(messages of chunks and of their carries, both directions) per link, and time = hops x latency +
bytes / bandwidth per link (sequential hops; the flat ring advances in lockstep, so over several nodes
every hop waits on an inter-node link; the two-level ring's inter-node chunk transfer overlaps its
intra-node ring and is counted as the max of the two, its carry hop after it), against the
gradient all-reduce of a B/16 and an L/16 CLIP in float32 (2 (R-1)/R x parameters x 4 bytes per
rank, at the inter-node bandwidth). Assumptions are printed with the table.

    python bench/loss_scaling.py                  -> bench/results/loss_scaling.json
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from common import save_results

from navit_clip import loss as L

B, D, WORLD, NODE = 256, 512, 8, 4
STEPS = 4
# the model's links: an 8-GPU node (NVLink) and one 400 Gb/s InfiniBand NIC per GPU
LINKS = {
    "intra": {"bandwidth_GBps": 150.0, "latency_us": 3.0},
    "inter": {"bandwidth_GBps": 50.0, "latency_us": 10.0},
}
PARAMS = {"B/16": 150e6, "L/16": 428e6}  # CLIP B/16 (86M image + 63M text), L/16 (304M + 123M)


def _count(traffic: Counter):
    """Wrap _Ring.start_shift: bytes and messages of every send, by the link it takes."""
    original = L._Ring.start_shift

    def counted(self, tensors, first_tag=0):
        if self.level == "ring":  # the flat ring as if over nodes of `node`: its hops cross nodes
            link = "inter"
        else:
            link = "intra" if self.level == "node" else "inter"
        traffic[f"{link}_bytes"] += sum(t.numel() * t.element_size() for t in tensors)
        traffic[f"{link}_messages"] += len(tensors)
        return original(self, tensors, first_tag)

    L._Ring.start_shift = counted


def _hops(topology: str, world: int, g: int) -> dict:
    """Sequential chunk hops a step (forward + backward) by link."""
    if topology == "ring":
        return {"intra": 0, "inter": 2 * (world - 1)}
    nodes = world // g
    return {"intra": 2 * nodes * (g - 1), "inter": 2 * (nodes - 1)}


def _rank(rank: int, world: int, store: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(minutes=5)
    )
    g = torch.Generator().manual_seed(rank)
    I = F.normalize(torch.randn(B, D, generator=g), dim=-1)
    T = F.normalize(I + 0.5 * torch.randn(B, D, generator=g), dim=-1)
    t = torch.tensor(4.0)
    traffic: Counter = Counter()
    _count(traffic)
    rows = {}
    for name, topology, comm in (
        ("flat", "ring", "float32"),
        ("hierarchical", "hierarchical", "float32"),
        ("flat_bf16", "ring", "bf16"),
        ("hierarchical_bf16", "hierarchical", "bf16"),
    ):
        fn = L.ContrastiveLoss(topology=topology, group_size=NODE, comm_dtype=comm, direct_max_slots=0)
        times, losses = [], []
        for step in range(STEPS + 1):
            Ii, Ti, ti = (x.clone().requires_grad_() for x in (I, T, t))
            traffic.clear()
            dist.barrier()
            t0 = time.perf_counter()
            loss = fn(Ii, Ti, None, ti)
            loss.backward()
            dist.barrier()
            if step:  # the first step makes the node groups
                times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
        rows[name] = {
            "time_ms": 1000 * statistics.median(times),
            "loss": losses[-1],
            "hops": _hops(topology, world, NODE),
            **{k: v for k, v in traffic.items()},
        }
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def measure() -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "rows.json")
        mp.spawn(_rank, args=(WORLD, os.path.join(folder, "store"), out), nprocs=WORLD, join=True)
        return json.loads(Path(out).read_text())


def bf16_error() -> dict:
    """Relative error of the loss and of every input gradient at s ~ 95, float32 and bf16 chunks,
    against float64: one process, the tiled path (what a rank computes)."""
    g = torch.Generator().manual_seed(0)
    n, dim = 1024, 512
    I = F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=-1)
    T = F.normalize(I + 0.3 * torch.randn(n, dim, generator=g, dtype=torch.float64), dim=-1)
    t = torch.tensor(float(torch.log(torch.tensor(95.0))), dtype=torch.float64)

    def run(dtype, comm):
        Ii, Ti, ti = (x.to(dtype).clone().requires_grad_() for x in (I, T, t))
        loss = L.clip_loss(Ii, Ti, None, ti, direct_max_slots=0, tile_size=256, comm_dtype=comm)
        loss.backward()
        return [x.double() for x in (loss.detach(), Ii.grad, Ti.grad, ti.grad)]

    ref = run(torch.float64, "float32")
    out = {}
    for comm in ("float32", "bf16"):
        got = run(torch.float32, comm)
        for name, a, b in zip(("loss", "d_image", "d_text", "d_logit_scale"), got, ref):
            out[f"rel_err_{name}_{comm}"] = float((a - b).norm() / b.norm())
    return out


def model(world: int, g: int, comm_bytes: int) -> dict:
    """Bytes and seconds a step per rank for both topologies (see the module docstring). Each
    direction (forward, backward) moves chunks W - 1 hops and their carries W hops (flat), or per node
    step g - 1 and g hops inside the node and 1 chunk hop (overlapped) and 1 carry hop between nodes."""
    chunks = B * D * comm_bytes + 2 * B * 4 + B * D * comm_bytes + 4 * B * 4  # fwd + bwd chunk
    carries = 2 * B * 4 + B * D * 4  # fwd column statistics + bwd dT (float32)
    nodes = world // g
    intra, inter = LINKS["intra"], LINKS["inter"]

    def seconds(link, hops, bytes_):
        return hops * link["latency_us"] * 1e-6 + bytes_ / (link["bandwidth_GBps"] * 1e9)

    flat_link = inter if nodes > 1 else intra  # every lockstep hop waits on the slowest link
    flat_bytes = (world - 1) * chunks + world * carries
    flat_hops = 2 * (world - 1) + 2 * world
    inner_s = seconds(intra, 2 * (g - 1) + 2 * g, (g - 1) * chunks + g * carries)
    outer_chunk_s = seconds(inter, 2, chunks) if nodes > 1 else 0.0
    outer_carry_s = seconds(inter, 2, carries) if nodes > 1 else 0.0
    return {
        "flat_bytes": flat_bytes,
        "flat_hops": flat_hops,
        "flat_s": seconds(flat_link, flat_hops, flat_bytes),
        "hier_bytes_intra": nodes * ((g - 1) * chunks + g * carries),
        "hier_bytes_inter": (nodes - 1) * chunks + (nodes * carries if nodes > 1 else 0),
        "hier_hops_intra": nodes * (2 * (g - 1) + 2 * g),
        "hier_hops_inter": 2 * (nodes - 1) + (2 * nodes if nodes > 1 else 0),
        "hier_s": nodes * (max(inner_s, outer_chunk_s) + outer_carry_s),
        **{f"allreduce_{k}_bytes": 2 * (world - 1) / world * p * 4 for k, p in PARAMS.items()},
        **{
            f"allreduce_{k}_s": 2 * (world - 1) / world * p * 4 / (inter["bandwidth_GBps"] * 1e9)
            for k, p in PARAMS.items()
        },
    }


def main() -> None:
    t0 = time.perf_counter()
    rows = measure()
    results: dict = {"b": B, "D": D, "world": WORLD, "ranks_per_node": NODE}
    print(f"measured: {WORLD} gloo processes on this machine, b={B}, D={D}, a forward + backward step")
    print(
        f"{'topology':>18} {'MB intra':>9} {'MB inter':>9} {'chunk hops in':>14} {'out':>5} {'ms':>8} {'loss':>10}"
    )
    for name, r in rows.items():
        mb_intra, mb_inter = r.get("intra_bytes", 0) / 1e6, r.get("inter_bytes", 0) / 1e6
        print(
            f"{name:>18} {mb_intra:9.2f} {mb_inter:9.2f} {r['hops']['intra']:14d} {r['hops']['inter']:5d} "
            f"{r['time_ms']:8.1f} {r['loss']:10.6f}"
        )
        results.update({f"{name}_{k}": v for k, v in r.items() if k != "hops"})
        results.update({f"{name}_hops_{k}": v for k, v in r["hops"].items()})
    results["ratio_inter_hops_flat_over_hierarchical"] = (
        rows["flat"]["hops"]["inter"] / rows["hierarchical"]["hops"]["inter"]
    )
    results["ratio_time_flat_over_hierarchical"] = round(
        rows["flat"]["time_ms"] / rows["hierarchical"]["time_ms"], 3
    )
    results["rel_loss_hierarchical_vs_flat"] = abs(rows["hierarchical"]["loss"] / rows["flat"]["loss"] - 1)
    print(
        f"sent = received per rank (a ring). inter-node hops flat / hierarchical: "
        f"{results['ratio_inter_hops_flat_over_hierarchical']:.1f}x; time flat / hierarchical "
        f"{results['ratio_time_flat_over_hierarchical']:.2f}x (one machine: no real inter-node latency)"
    )

    err = bf16_error()
    results.update(err)
    print("\ncomm_dtype error at s = 95 against float64 (1024 slots, D = 512, tiled path):")
    for comm in ("float32", "bf16"):
        print(
            f"  {comm:>8}: loss {err[f'rel_err_loss_{comm}']:.1e}, d_image {err[f'rel_err_d_image_{comm}']:.1e}, "
            f"d_text {err[f'rel_err_d_text_{comm}']:.1e}, d_logit_scale {err[f'rel_err_d_logit_scale_{comm}']:.1e}"
        )

    print(
        "\nmodel (msgs: sequential messages a step, chunks and their carries, both directions; "
        "GB in/out: inside / between nodes)"
    )
    print(
        f"model: b={B}, D={D}, nodes of 8; links: intra-node {LINKS['intra']['bandwidth_GBps']:.0f} GB/s, "
        f"{LINKS['intra']['latency_us']:.0f} us a hop; inter-node {LINKS['inter']['bandwidth_GBps']:.0f} GB/s, "
        f"{LINKS['inter']['latency_us']:.0f} us a hop; float32 chunks (bf16: half the chunk bytes)"
    )
    print(
        f"{'ranks':>6} {'flat GB':>8} {'flat msgs':>10} {'flat ms':>8} {'hier GB in/out':>15} "
        f"{'hier msgs in/out':>17} {'hier ms':>8} {'flat/hier':>9} {'AR B/16 GB, ms':>15} {'AR L/16 GB, ms':>15}"
    )
    for world in (8, 16, 32, 64, 128, 256, 512, 1024):
        m = model(world, 8, 4)
        mb = model(world, 8, 2)
        results[f"model_{world}"] = m
        results[f"model_{world}_bf16"] = mb
        results[f"ratio_model_time_flat_over_hier_{world}"] = round(m["flat_s"] / m["hier_s"], 2)
        print(
            f"{world:6d} {m['flat_bytes'] / 1e9:8.3f} {m['flat_hops']:10d} {1e3 * m['flat_s']:8.2f} "
            f"{m['hier_bytes_intra'] / 1e9:7.3f}/{m['hier_bytes_inter'] / 1e9:.3f} "
            f"{m['hier_hops_intra']:8d}/{m['hier_hops_inter']:<8d} {1e3 * m['hier_s']:8.2f} "
            f"{m['flat_s'] / m['hier_s']:9.1f} "
            f"{m['allreduce_B/16_bytes'] / 1e9:6.2f}, {1e3 * m['allreduce_B/16_s']:6.1f} "
            f"{m['allreduce_L/16_bytes'] / 1e9:6.2f}, {1e3 * m['allreduce_L/16_s']:6.1f}"
        )
    m, mb = results["model_1024"], results["model_1024_bf16"]
    print(
        f"at 1024 ranks bf16 chunks: flat {mb['flat_bytes'] / 1e9:.2f} GB, {1e3 * mb['flat_s']:.1f} ms; "
        f"hierarchical {mb['hier_bytes_inter'] / 1e9:.3f} GB inter-node, {1e3 * mb['hier_s']:.1f} ms"
    )
    results["seconds"] = round(time.perf_counter() - t0, 1)
    save_results("loss_scaling", results)


if __name__ == "__main__":
    main()
