"""Forward+backward tokens/s of the packed NaViT tower vs open_clip's ViT, same run (CPU by default).

Both towers: the same width, depth, heads and MLP ratio, biases on, no qk-norm. open_clip's ViT sees
224 x 224 images (196 patches + 1 class token), about as many tokens per step as ours. Ours runs
three workloads of packed sequences:
    mixed   longer side ~ U(64, 384) px, aspect 1:3..3:1 (the paper's contrastive recipe, the same
            draw as bench/packing.py; images are smaller than 224 x 224 on average, but the largest
            have up to 576 tokens, so attention per token depends on the mix: FLOP/s is printed too);
    large   longer side ~ U(64, 512) px, the same aspects: images up to 1024 tokens, so attention costs
            more per token than the peer's 197-token images (tokens/s drops, FLOP/s shows the efficiency);
    square  the peer's own 224 x 224 images, packed 5 to a sequence (the same work per token: this
            isolates the cost of packing and block-diagonal attention).
Tokens/s counts the tokens each model really processes (ours: image tokens, padding excluded;
open_clip: 197 per image). Timings alternate between the models and each keeps its fastest step (noise only adds time).
`ratio_tokens_per_s_best` is the best backend on the mixed workload.

    python bench/vision_tower.py     -> bench/results/vision_tower.json
    python bench/vision_tower.py --device cuda --precision bf16 --num-seqs 32
                                     -> bench/results/vision_tower_cuda.json (adds flex, and varlen in bf16)
"""

import argparse
import contextlib
import time

import torch
from common import mixed_grids, save_results
from open_clip.transformer import VisionTransformer

from navit_clip.model import NaViT, VisionConfig
from navit_clip.packing import build_packed_batch, first_fit

WIDTH, DEPTH, HEADS, MLP, P = 384, 6, 6, 4.0, 16
SEQ_LEN, NUM_SEQS, MAX_IMAGES = 1024, 4, 32
WARMUP, REPEATS = 2, 8


def packed_batch(workload: str, num_seqs: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = []
    while sum(h * w for h, w in shapes) < 1.2 * SEQ_LEN * num_seqs:
        if workload == "square":
            shapes.append((224 // P, 224 // P))
        else:
            shapes += mixed_grids(1, SEQ_LEN, g, P, max_side=384 if workload == "mixed" else 512)
    sizes = [h * w for h, w in shapes]
    bins, _ = first_fit(sizes, SEQ_LEN, MAX_IMAGES, num_seqs=num_seqs)
    patches = [torch.randn(h * w, P * P * 3, generator=g) for h, w in shapes]
    coords = [
        torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).view(-1, 2)
        for h, w in shapes
    ]
    return build_packed_batch(patches, coords, bins, SEQ_LEN, MAX_IMAGES, num_seqs=num_seqs)


def step_flops(image_tokens: list[int]) -> float:
    """Forward+backward FLOPs of the transformer blocks (3x forward): dense layers 24 D^2 per token,
    attention 4 n D per token of an n-token image, per layer. Normalises away the workload's size mix."""
    per_layer = sum(n * 24 * WIDTH**2 + 4 * n * n * WIDTH for n in image_tokens)
    return 3 * DEPTH * per_layer


def step_time(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def build(device, backends: list[str], num_seqs: int):
    """The packed batches of each workload, open_clip's images and ViT, and one NaViT per backend."""
    torch.manual_seed(0)
    batches = {w: packed_batch(w, num_seqs) for w in ("mixed", "large", "square")}
    real = {w: int((b.segment_ids > 0).sum()) for w, b in batches.items()}
    batches = {w: b.to(device) for w, b in batches.items()}
    n_images = max(1, round(real["mixed"] / 197))
    pixels = torch.randn(n_images, 3, 224, 224, device=device)
    peer = VisionTransformer(224, P, WIDTH, DEPTH, HEADS, MLP, output_dim=WIDTH).to(device)
    config = dict(
        patch_size=P, width=WIDTH, depth=DEPTH, heads=HEADS, mlp_ratio=MLP, qk_norm=False, bias=True
    )
    ours = {b: NaViT(VisionConfig(**config, pool="map", attn_backend=b)).to(device) for b in backends}
    return batches, real, pixels, peer, ours


def fastest(fns: dict, device) -> dict[str, float]:
    """Each step's fastest time over REPEATS rounds after WARMUP, the steps alternating within a round
    (noise on a shared machine only adds time)."""
    times = {k: [] for k in fns}
    for i in range(WARMUP + REPEATS):
        for k, fn in fns.items():
            dt = step_time(fn, device)
            if i >= WARMUP:
                times[k].append(dt)
    return {k: min(v) for k, v in times.items()}


def report(results: dict, fns: dict, tps: dict, fps: dict, med: dict, backends: list[str], workloads) -> None:
    """Print and record tokens/s and FLOP/s of every step, its ratios and the best backend a workload."""
    for k in fns:
        results[f"tokens_per_s_{k}"] = tps[k]
        line = f"{k:22s} {tps[k]:9.0f} tokens/s  ({1e3 * med[k]:.0f} ms/step)"
        results[f"gflops_per_s_{k}"] = fps[k] / 1e9
        line += f"  {fps[k] / 1e9:5.1f} GFLOP/s"
        if k != "open_clip":
            results[f"ratio_tokens_per_s_{k}"] = tps[k] / tps["open_clip"]
            results[f"ratio_flops_per_s_{k}"] = fps[k] / fps["open_clip"]
            line += f"  tokens/s ratio vs open_clip {tps[k] / tps['open_clip']:.2f}x, FLOP/s ratio {fps[k] / fps['open_clip']:.2f}x"
        print(line)
    for w in workloads:
        best = max(backends, key=lambda b: tps[f"ours_{b}_{w}"])
        results[f"best_backend_{w}"] = best
        results[f"ratio_tokens_per_s_best_{w}"] = tps[f"ours_{best}_{w}"] / tps["open_clip"]
        results[f"ratio_flops_per_s_best_{w}"] = fps[f"ours_{best}_{w}"] / fps["open_clip"]
        print(
            f"best on {w}: {best} at {results[f'ratio_tokens_per_s_best_{w}']:.2f}x open_clip's tokens/s, "
            f"{results[f'ratio_flops_per_s_best_{w}']:.2f}x its FLOP/s"
        )
    results["ratio_tokens_per_s_best"] = results["ratio_tokens_per_s_best_mixed"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast, both models"
    )
    ap.add_argument("--num-seqs", type=int, default=NUM_SEQS, help="packed sequences per step")
    args = ap.parse_args()
    device = torch.device(args.device)
    bf16 = args.precision == "bf16"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    backends = ["dense", "grouped"]
    if device.type == "cuda":
        backends += ["flex", "varlen"] if bf16 else ["flex"]  # varlen is flash attention: half precision only
    batches, real, pixels, peer, ours = build(device, backends, args.num_seqs)
    n_images = pixels.shape[0]

    def run_peer():
        with autocast:
            loss = peer(pixels).float().square().mean()
        loss.backward()

    def run_ours(model, batch):
        def step():
            with autocast:
                loss = model(batch).pooled.float().square().mean()
            loss.backward()

        return step

    fns, tokens = {"open_clip": run_peer}, {"open_clip": n_images * 197}
    for w, batch in batches.items():
        for b, m in ours.items():
            fns[f"ours_{b}_{w}"] = run_ours(m, batch)
            tokens[f"ours_{b}_{w}"] = real[w]
    med = fastest(fns, device)
    tps = {k: tokens[k] / med[k] for k in fns}
    lengths = {  # tokens of every packed image
        w: torch.stack([(b.segment_ids == e + 1).sum(1) for e in range(MAX_IMAGES)], 1)[b.slot_valid].tolist()
        for w, b in batches.items()
    }
    flops = {
        "open_clip": step_flops([197] * n_images),
        **{k: step_flops(lengths[k.rsplit("_", 1)[1]]) for k in fns if k != "open_clip"},
    }
    fps = {k: flops[k] / med[k] for k in fns}
    results = {
        "width": WIDTH,
        "depth": DEPTH,
        "heads": HEADS,
        "mlp_ratio": MLP,
        "patch_size": P,
        "seq_len": SEQ_LEN,
        "num_seqs": args.num_seqs,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": args.precision,
        "open_clip_images": n_images,
        "threads": torch.get_num_threads(),
        "repeats": REPEATS,
    }
    for w, batch in batches.items():
        results[f"images_{w}"] = batch.num_images
        results[f"padding_fraction_{w}"] = batch.padding_fraction
        print(
            f"ours {w}: {batch.num_images} images, {real[w]} tokens in {args.num_seqs}x{SEQ_LEN} "
            f"({100 * batch.padding_fraction:.1f}% padding, {real[w] / batch.num_images:.0f} tokens/image)"
        )
    print(f"open_clip: {n_images} images x 197 tokens")
    report(results, fns, tps, fps, med, list(ours), list(batches))
    save_results("vision_tower" if device.type == "cpu" else f"vision_tower_{device.type}", results)


if __name__ == "__main__":
    main()
