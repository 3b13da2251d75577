"""Training-step images/s and tokens/s: the demo-size NaViT-CLIP vs open_clip's CLIP, same run, CPU.

Both models: vision width 128, depth 4, 4 heads, MLP ratio 3; text width 128, depth 2, 4 heads,
context 24; embed 128; AdamW; the softmax CLIP loss; about 4096 image tokens per step. open_clip's
ViT sees 224 x 224 images (RandomResizedCrop, its training transform). Ours sees the paper's recipe
at the demo model's sequence length L = 256 (as the paper's B/16): 16 packed sequences, longer side
~ U(64, 256) px (so every image fits a sequence) and Beta token dropping with mean rate 0.5
(`recipe`), or the same without dropping (`nodrop`). These images are smaller than 224 x 224 on
average (pixels per image are printed): the `nodrop` ratio shows what resolution sampling alone
gives, `recipe` adds dropping. `recipe_matched_pixels` keeps the per-image pixel count of the peer
instead: L = 1024, longer side ~ U(64, 496), Beta dropping 0.5; there big images cost more
attention per token (it grows with tokens per image). Both read the demo shards; batches are loaded
before the clock starts, so this times the training step alone (bench/loader.py times the data side):
16 steps a side, interleaved, and the median of the per-step rates. Each ratio also prints the
middle half (quartiles) of its per-round ratios (one step of each side back to back): one run's
ratio is no better known than that.

`--e2e` times what a user runs instead: each side's own loader (one worker, as the demo) feeding its
training step, over the demo's shards, the clock running over loading and stepping together.
Both modes print the step's FLOP/s against this machine's fp32 matmul peak, measured in the same run:
FLOPs per image token counted by torch.utils.flop_counter over every preloaded batch (forward,
backward, optimiser), times the measured tokens/s. Each side steps with its own trainer's optimiser:
ours the fused AdamW of `navit_clip.train.make_optimizer`, open_clip's the plain `torch.optim.AdamW`
that open_clip_train builds.

    python bench/train_throughput.py         -> bench/results/train_throughput.json
    python bench/train_throughput.py --e2e   -> bench/results/train_throughput_e2e.json
    python bench/train_throughput.py --precision bf16   -> bench/results/train_throughput_bf16.json

`--precision bf16` runs both sides' forward and loss under bf16 autocast (ours as `train.precision=bf16`
runs it, open_clip's as open_clip_train's `--precision amp_bf16`) and measures the peak in bf16.
"""

import argparse
import statistics
import time

import open_clip
import torch
from common import save_results
from open_clip.loss import ClipLoss
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from navit_clip.config import load_config
from navit_clip.data.demo import ensure_demo_data
from navit_clip.data.pipeline import PackedImageText, make_loader
from navit_clip.data.shards import in_order
from navit_clip.loss import ContrastiveLoss
from navit_clip.model.clip import NaViTCLIP
from navit_clip.packing import ResolutionPolicy, TokenDropConfig
from navit_clip.tokenizer import build_tokenizer
from navit_clip.train import autocast_for, make_optimizer

SEQ_LEN, NUM_SEQS, MAX_IMAGES, MAX_SIDE = 256, 16, 32, 256
MATCHED = dict(seq_len=1024, num_seqs=4, max_images=64, max_side=496)  # about 224 x 224 pixels per image
BATCHES, WARMUP, REPEATS = 4, 2, 16
PEER = "open_clip"


def our_setup(
    shards: str,
    drop: bool,
    precision: str,
    seq_len=SEQ_LEN,
    num_seqs=NUM_SEQS,
    max_images=MAX_IMAGES,
    max_side=MAX_SIDE,
):
    cfg = load_config(
        "configs/demo.yaml",
        [
            "demo=false",
            f"data.shards={shards}",
            f"data.seq_len={seq_len}",
            f"data.max_images={max_images}",
            f"data.batch_seqs={num_seqs}",
        ],
    )
    cfg.data.resolution = ResolutionPolicy("side_sampling", 64, max_side, "uniform")
    cfg.data.token_drop = TokenDropConfig("beta", rate=0.5, d_max=0.9) if drop else TokenDropConfig("none")
    cfg.data.shuffle_buffer = 0
    tok = build_tokenizer("openclip", context_length=cfg.tokenizer.context_length)
    cfg.model.text.vocab_size, cfg.model.text.pad_id = tok.num_embeddings, tok.pad_id
    torch.manual_seed(0)
    model = NaViTCLIP(cfg.model)
    stream = iter(PackedImageText(cfg.data, tok))
    batches = [next(stream).to("cpu") for _ in range(BATCHES)]
    opt = make_optimizer(model, cfg.train)  # what train_clip.py steps with
    loss_fn = ContrastiveLoss("softmax")
    autocast = autocast_for(precision, torch.device("cpu"))

    def step(batch):
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = model(batch.images, batch.text)
        loss_fn(out["image_emb"], out["text_emb"], out["valid"], out["logit_scale"]).backward()
        opt.step()
        s = batch.stats
        return s["images"], s["tokens"], (s["tokens"] + s["tokens_dropped"]) * 16**2

    def loader():  # as the trainer reads it: one worker, uint8 batches normalised by .to()
        return (b.to("cpu") for b in make_loader(PackedImageText(cfg.data, tok), num_workers=1))

    return model, batches, step, loader


def peer_setup(shards: str, n_images: int, precision: str):
    vision = CLIPVisionCfg(layers=4, width=128, head_width=32, mlp_ratio=3.0, patch_size=16, image_size=224)
    text = CLIPTextCfg(context_length=24, width=128, heads=4, layers=2, mlp_ratio=3.0)
    torch.manual_seed(0)
    model = CLIP(embed_dim=128, vision_cfg=vision, text_cfg=text)
    transform = open_clip.image_transform(224, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=24)
    ds = in_order(shards).decode("pil").to_tuple("jpg;png", "txt")
    ds = ds.map_tuple(transform, lambda t: t).batched(n_images).map(lambda b: (b[0], tokenizer(list(b[1]))))
    batches = []
    for batch in ds:
        batches.append(batch)
        if len(batches) == BATCHES:
            break
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = ClipLoss()
    autocast = autocast_for(precision, torch.device("cpu"))

    def step(batch):
        images, texts = batch
        opt.zero_grad(set_to_none=True)
        with autocast:
            img, txt, scale = model(images, texts)
            loss = loss_fn(img, txt, scale)
        loss.backward()
        opt.step()
        return images.shape[0], images.shape[0] * 197, images.shape[0] * 224**2

    def loader():
        return iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1, prefetch_factor=2))

    return model, batches, step, loader


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of one large square matmul in `dtype` on this machine (best of `repeats`)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def flops_per_token(step, batches) -> float:
    """FLOPs per image token of a training step (forward, backward, optimiser), as torch counts them,
    over all `batches` (per token, not per image: packed batches differ in images per step)."""
    from torch.utils.flop_counter import FlopCounterMode

    tokens = 0
    with FlopCounterMode(display=False) as counter:
        for batch in batches:
            tokens += step(batch)[1]
    return counter.get_total_flops() / tokens


def measure_e2e(setups: dict, steps: int = 12, warmup: int = 3) -> dict:
    """Loader + step, one side after the other, each with its own one-worker loader."""
    out = {}
    for k, (_, _, step, loader) in setups.items():
        it = loader()
        for _ in range(warmup):
            step(next(it))
        images = tokens = 0
        t0 = time.perf_counter()
        for _ in range(steps):
            n_img, n_tok, _ = step(next(it))
            images, tokens = images + n_img, tokens + n_tok
        dt = time.perf_counter() - t0
        out[k] = {"images_per_s": images / dt, "tokens_per_s": tokens / dt, "step_s": dt / steps}
        del it
    return out


def measure(setups: dict) -> dict:
    """Steps of the setups interleaved (so a slower stretch of the machine hits every side alike);
    per side the median over its steps of images/s and tokens/s, robust to the odd slow step.
    Per round (one step of every side, back to back) each side's tokens/s over open_clip's in the
    same round: their quartiles say how far one run's ratio can be trusted."""
    rates = {k: [] for k in setups}  # (images/s, tokens/s, images, pixels) per step
    for i in range(WARMUP + REPEATS):
        for k, (_, batches, step, _) in setups.items():
            t0 = time.perf_counter()
            images, tokens, pixels = step(batches[i % len(batches)])
            dt = time.perf_counter() - t0
            if i >= WARMUP:
                rates[k].append((images / dt, tokens / dt, images, pixels))
    out = {}
    for k, v in rates.items():
        images, pixels = sum(r[2] for r in v), sum(r[3] for r in v)
        out[k] = {
            "images_per_s": statistics.median(r[0] for r in v),
            "tokens_per_s": statistics.median(r[1] for r in v),
            "images_per_step": images / len(v),
            "pixels_per_image": pixels / images,
        }
        if k != PEER:
            paired = [r[1] / p[1] for r, p in zip(v, rates[PEER])]
            q1, _, q3 = statistics.quantiles(paired, n=4)
            out[k] |= {"round_ratio_tokens_per_s_q1": q1, "round_ratio_tokens_per_s_q3": q3}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--e2e", action="store_true", help="time loader + step together, one worker each")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="both sides (see above)")
    args = ap.parse_args()
    shards = ensure_demo_data()["train"]
    p = args.precision
    setups = {
        "recipe": our_setup(shards, drop=True, precision=p),
        "nodrop": our_setup(shards, drop=False, precision=p),
        "recipe_matched_pixels": our_setup(shards, drop=True, precision=p, **MATCHED),
    }
    peer_images = round(NUM_SEQS * SEQ_LEN / 197)  # the same tokens per step as a packed batch
    setups[PEER] = peer_setup(shards, peer_images, p)
    peak = matmul_peak(torch.bfloat16 if p == "bf16" else torch.float32)
    flops = {k: flops_per_token(step, batches) for k, (_, batches, step, _) in setups.items()}
    r = measure_e2e(setups) if args.e2e else measure(setups)
    results = {
        "mode": "e2e (loader + step)" if args.e2e else "step",
        "precision": p,
        "seq_len": SEQ_LEN,
        "num_seqs": NUM_SEQS,
        "max_side": MAX_SIDE,
        "open_clip_batch": peer_images,
        "repeats": REPEATS,
        "threads": torch.get_num_threads(),
        "matmul_peak_gflops": peak / 1e9,
    }
    print(f"{p} matmul peak on this machine: {peak / 1e9:.0f} GFLOP/s")
    for k, v in r.items():
        v["gflops"] = flops[k] / 1e9 * v["tokens_per_s"]
        v["fraction_of_peak"] = v["gflops"] * 1e9 / peak
        for m, x in v.items():
            results[f"{m}_{k}"] = x
        print(
            f"{k:22s} {v['images_per_s']:7.1f} images/s {v['tokens_per_s']:8.0f} tokens/s "
            f"{v['gflops']:6.1f} GFLOP/s ({100 * v['fraction_of_peak']:.0f}% of peak)"
        )
    for k in ("recipe", "nodrop", "recipe_matched_pixels"):
        results[f"ratio_images_per_s_{k}"] = r[k]["images_per_s"] / r[PEER]["images_per_s"]
        results[f"ratio_tokens_per_s_{k}"] = r[k]["tokens_per_s"] / r[PEER]["tokens_per_s"]
        spread = ""
        if "round_ratio_tokens_per_s_q1" in r[k]:
            q1, q3 = r[k]["round_ratio_tokens_per_s_q1"], r[k]["round_ratio_tokens_per_s_q3"]
            spread = f" (per round: middle half {q1:.2f}-{q3:.2f}x)"
        print(
            f"ratio {k} / open_clip: images/s {results[f'ratio_images_per_s_{k}']:.2f}x, "
            f"tokens/s {results[f'ratio_tokens_per_s_{k}']:.2f}x{spread}"
        )
    name = "train_throughput" + ("_e2e" if args.e2e else "") + ("_bf16" if p == "bf16" else "")
    save_results(name, results)


if __name__ == "__main__":
    main()
