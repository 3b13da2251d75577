"""The learning race: zero-shot top-1 of navit-clip and open_clip after equal wall-clock training.

Both learn the same shape-only task (navit_clip/data/demo.py: ten shapes in random colours, sizes,
aspect ratios 1:2..2:1 and positions; only the shape decides the class), from the same webdataset
shards, at the same size (open_clip's ViT-Ti shape: vision width 192, depth 6, 3 heads, patch 16;
text width 192, depth 4, 3 heads, context 32; embed 256) with the same optimiser settings (AdamW,
lr 5e-4, betas (0.9, 0.98), eps 1e-6, weight decay 0.1 on weight matrices, 60 warm-up steps, then
a cosine over the wall-clock budget; no gradient clipping, open_clip's default), one after the
other in one process:
  - navit-clip with the NaViT recipe: native aspect ratio, longer side ~ U(48, 128) px, Beta token
    dropping (mean 0.25), 8 packed sequences of 256 tokens per step, through its own data pipeline,
    model, loss and the defaults of navit_clip's configs (anything a user does not set);
  - open_clip's own `CLIP` model (96 x 96 px, 36 tokens) and `ClipLoss` in a plain loop, batch 64
    (about as many tokens per step), its own train / val transforms.
Each trains in its best precision on the device: navit-clip in `--precision` (default auto: bf16
autocast where the device multiplies bf16 natively, a CPU with AMX or a GPU, else float32), open_clip
in `--openclip-precision` (default auto: float32 on CPU, where its bf16 autocast, as open_clip_train
runs `--precision amp_bf16`, gained it no steps and lost it 7.6 points at 90 s; navit-clip's
precision elsewhere). Both evaluate in float32.
The clock runs while training (data loading included) and stops for evaluation. At each budget both
are evaluated zero-shot on the same held-out image folder: open_clip at 96 x 96 (36 tokens), navit-clip
at 36 tokens per image (aspect kept; the headline ratio, equal inference compute), at native
resolution and, at the last budget, at several token budgets.

    python bench/learning_race.py                          -> bench/results/learning_race.json
    python bench/learning_race.py --budgets 60,120 --only navit model.vision.pool=mean   (an ablation)
    python bench/learning_race.py --seeds 0,1,2              (three races; means and spread)
    python bench/learning_race.py --device cuda
    python bench/learning_race.py --precision fp32          (both sides in float32, as before 2026-11-22)
    python bench/learning_race.py --task digits            (real scans: bench/digits.py, needs scikit-learn)
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from pathlib import Path

import open_clip
import torch
import webdataset as wds
from common import save_results
from open_clip.loss import ClipLoss

from navit_clip.checkpoint import load_weights
from navit_clip.config import load_config, to_dict
from navit_clip.data.demo import TASKS, ensure_demo_data
from navit_clip.data.pipeline import PackedImageText, folder_samples, make_loader
from navit_clip.loss import ContrastiveLoss
from navit_clip.model.clip import NaViTCLIP
from navit_clip.packing import ResolutionPolicy
from navit_clip.tokenizer import tokenizer_for
from navit_clip.train import MAX_LOGIT_SCALE, autocast_for, make_optimizer, resolve_precision
from navit_clip.zeroshot import build_classifier, eval_data_config, evaluate_zeroshot

ROOT = Path(__file__).resolve().parent.parent
SHARED = dict(lr=5e-4, weight_decay=0.1, warmup=60, grad_clip=0.0)  # no clipping: open_clip's default
NAVIT = [  # the race's navit-clip: the ViT-Ti shape and the NaViT recipe, defaults for everything else
    "demo=false",
    "model.embed_dim=256",
    "model.vision.width=192",
    "model.vision.depth=6",
    "model.vision.heads=3",
    "model.vision.mlp_ratio=4.0",
    "data.seq_len=256",
    "data.max_images=32",
    "model.text.width=192",
    "model.text.depth=4",
    "model.text.heads=3",
    "model.text.mlp_ratio=4.0",
    "model.text.context_length=32",
    "tokenizer.context_length=32",
    "data.batch_seqs=8",
    "data.num_workers=1",
    "data.shuffle_buffer=500",
    "data.resolution.kind=side_sampling",
    "data.resolution.min_side=48",
    "data.resolution.max_side=128",
    "data.token_drop.kind=beta",
    "data.token_drop.rate=0.25",
    f"train.lr={SHARED['lr']}",
    f"train.weight_decay={SHARED['weight_decay']}",
    f"train.warmup={SHARED['warmup']}",
    f"train.grad_clip={SHARED['grad_clip']}",
]
OPENCLIP_BATCH, OPENCLIP_SIZE = 64, 96
BUDGET_TOKENS = (16, 36, 64, 144, 256)


class Schedule:
    """Linear warm-up over steps, then a cosine over the wall-clock budget (the same rule for both)."""

    def __init__(self, optimizer, warmup: int, total_s: float):
        self.optimizer, self.warmup, self.total_s = optimizer, warmup, total_s
        self.base = [g["lr"] for g in optimizer.param_groups]

    def set(self, step: int, elapsed_s: float) -> float:
        if step < self.warmup:
            f = (step + 1) / self.warmup
        else:
            f = 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed_s / self.total_s)))
        for g, lr in zip(self.optimizer.param_groups, self.base):
            g["lr"] = lr * f
        return f


def race(name: str, step_fn, eval_fn, budgets: list[float], log_every: int = 20) -> dict:
    """Train with `step_fn(step) -> dict of curves` until each budget (training seconds), evaluating there."""
    out: dict = {"curve": []}
    elapsed, step = 0.0, 0
    for budget in budgets:
        while elapsed < budget:
            t0 = time.perf_counter()
            curves = step_fn(step, elapsed)
            elapsed += time.perf_counter() - t0
            step += 1
            if step % log_every == 0:
                out["curve"].append({"step": step, "time_s": round(elapsed, 1), **curves})
                print(
                    f"  {name} step {step:4d} {elapsed:6.1f}s "
                    + " ".join(f"{k} {v:.4g}" for k, v in curves.items())
                )
        t0 = time.perf_counter()
        acc = eval_fn(budget == budgets[-1])
        print(f"  {name} at {budget:.0f}s ({step} steps): {acc} (eval {time.perf_counter() - t0:.0f}s)")
        out[f"at_{budget:.0f}s"] = {"steps": step, **acc}
    return out


def run_navit(
    data: dict,
    budgets: list[float],
    overrides: list[str],
    device: torch.device,
    save: str | None = None,
    seed: int = 0,
    precision: str = "fp32",
) -> dict:
    # before the user's overrides, which win
    seeded = [f"train.seed={seed}", f"data.seed={seed}", f"train.precision={precision}"]
    cfg = load_config(
        str(ROOT / "configs" / "demo.yaml"), NAVIT + [f"data.shards={data['train']}"] + seeded + overrides
    )
    tok = tokenizer_for(cfg)
    cfg.validate()
    tc = cfg.train
    torch.manual_seed(tc.seed)
    model = NaViTCLIP(cfg.model)
    if cfg.model.init_from:
        load_weights(cfg.model.init_from, model)
    model = model.to(device).train()
    opt = make_optimizer(model, tc)  # navit-clip's own (fused); open_clip's below is its trainer's
    sched = Schedule(opt, tc.warmup, budgets[-1])
    loss_fn = ContrastiveLoss(cfg.loss.kind, comm_dtype=cfg.loss.comm_dtype)
    autocast = autocast_for(tc.precision, device)
    batches = iter(make_loader(PackedImageText(cfg.data, tok)))
    print(
        f"navit-clip: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"grad_clip {tc.grad_clip}, {tc.precision}"
    )

    def step_fn(step: int, elapsed: float) -> dict:
        sched.set(step, elapsed)
        batch = next(batches).to(device)
        with autocast:
            out = model(batch.images, batch.text)
        loss = loss_fn(  # logit_bias: a SigLIP model's (loss.kind=sigmoid), e.g. a converted SigLIP2
            out["image_emb"], out["text_emb"], out["valid"], out["logit_scale"], out.get("logit_bias")
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf
        )
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        return {
            "loss": loss.item(),
            "grad_norm": norm.item(),
            "logit_scale": model.logit_scale.exp().item(),
            "images": batch.stats["images"],
        }

    def eval_fn(last: bool) -> dict:
        return navit_zeroshot(model, tok, cfg, data, device, BUDGET_TOKENS if last else (36,))

    result = race("navit", step_fn, eval_fn, budgets)
    if save:  # a checkpoint `navit-clip eval` reads, for looking at the raced model afterwards
        torch.save({"model": model.state_dict(), "config": to_dict(cfg)}, save)
        print(f"saved navit-clip's final weights to {save}")
    return result


def navit_zeroshot(model, tok, cfg, data: dict, device, tokens=(36,)) -> dict:
    """navit-clip's zero-shot top-1 on the held-out folder at native size (longer side up to 192 px)
    and at each token budget per image (aspect kept), in float32; the model is left in train mode."""
    model.eval()
    classnames = Path(data["classnames"]).read_text().split()
    classifier = build_classifier(model, tok, classnames, list(data["templates"]), device)
    policies = {"native": ResolutionPolicy("native", max_side=192)}
    policies.update({str(t): ResolutionPolicy("budget", tokens=t) for t in tokens})
    acc = {}
    for key, policy in policies.items():
        dc = eval_data_config(cfg.data, data["heldout_folder"], "cls", policy, batch_seqs=8)
        acc[f"top1_{key}"] = round(evaluate_zeroshot(model, classifier, dc, device)["top1"], 4)
    model.train()
    return acc


# open_clip's side: its CLIP at the ViT-Ti shape (a model-config dict, as open_clip's JSON files hold)
OPENCLIP_CONFIG = {
    "embed_dim": 256,
    "vision_cfg": {
        "image_size": OPENCLIP_SIZE,
        "layers": 6,
        "width": 192,
        "head_width": 64,
        "patch_size": 16,
    },
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 192, "heads": 3, "layers": 4},
}


def openclip_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW as open_clip_train.main builds it: no weight decay on gains, biases, norms, logit_scale."""
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    return torch.optim.AdamW(
        [
            {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": SHARED["weight_decay"]},
        ],
        lr=lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )


def openclip_batches(data: dict, seed: int, train_tf, tok):
    """open_clip's webdataset stream of (images, token ids) batches, resampled, one loader worker."""
    pipeline = wds.DataPipeline(
        wds.ResampledShards(data["train"], seed=seed, deterministic=True),
        wds.tarfile_to_samples(),
        wds.shuffle(500, initial=250, seed=seed),
        wds.decode("pil"),
        wds.to_tuple("jpg;png", "txt"),
        wds.map_tuple(train_tf, lambda t: tok([t])[0]),
        wds.batched(OPENCLIP_BATCH),
    )
    return iter(torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=1, prefetch_factor=2))


def run_openclip(
    data: dict,
    budgets: list[float],
    grad_clip: float,
    device: torch.device,
    seed: int = 0,
    precision: str = "fp32",
    model: torch.nn.Module | None = None,
    lr: float = SHARED["lr"],
    warmup: int = SHARED["warmup"],
) -> dict:
    """open_clip's model and loss in its trainer's loop; `model`: start from it (trained in place)."""
    torch.manual_seed(seed)
    model = (model if model is not None else open_clip.CLIP(**OPENCLIP_CONFIG)).to(device)
    train_tf = open_clip.image_transform(OPENCLIP_SIZE, is_train=True)
    val_tf = open_clip.image_transform(OPENCLIP_SIZE, is_train=False)
    tok = open_clip.get_tokenizer("ViT-B-32", context_length=32)
    opt = openclip_optimizer(model, lr)
    sched = Schedule(opt, warmup, budgets[-1])
    loss_fn = ClipLoss()
    autocast = autocast_for(precision, device)
    batches = openclip_batches(data, seed, train_tf, tok)
    classnames = Path(data["classnames"]).read_text().split()
    templates = list(data["templates"])
    held = list(folder_samples(data["heldout_folder"]))

    def step_fn(step: int, elapsed: float) -> dict:
        sched.set(step, elapsed)
        images, texts = next(batches)
        with autocast:  # forward and loss, as open_clip_train runs them under --precision amp_bf16
            image_features, text_features, logit_scale = model(images.to(device), texts.to(device))
            loss = loss_fn(image_features, text_features, logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        return {"loss": loss.item(), "grad_norm": norm.item(), "logit_scale": model.logit_scale.exp().item()}

    @torch.no_grad()
    def eval_fn(last: bool) -> dict:
        import io

        from PIL import Image

        model.eval()
        classifier = build_classifier(model, tok, classnames, templates, device)
        correct = 0
        for i in range(0, len(held), 128):
            chunk = held[i : i + 128]
            ims = [
                val_tf(
                    Image.open(
                        io.BytesIO(next(v for k, v in s.items() if k not in ("__key__", "cls")))
                    ).convert("RGB")
                )
                for s in chunk
            ]
            emb = model.encode_image(torch.stack(ims).to(device), normalize=True)
            labels = torch.tensor([int(s["cls"]) for s in chunk], device=device)
            correct += int(((emb @ classifier).argmax(1) == labels).sum())
        model.train()
        return {"top1_96px": round(correct / len(held), 4)}

    return race("open_clip", step_fn, eval_fn, budgets)


def race_data(task: str, root: str | None) -> dict:
    """The task's generated shards, held-out folder, class names and zero-shot templates."""
    if task == "digits":
        from digits import ZEROSHOT_TEMPLATES as templates
        from digits import ensure_digit_data

        root = root or str(ROOT / "bench" / "results" / "race_data_digits")
        return {**ensure_digit_data(root), "templates": templates, "root": root}
    root = root or str(ROOT / "bench" / "results" / "race_data")
    return {
        **ensure_demo_data(root, n_train=8000, n_heldout=500, task="shapes"),
        "templates": TASKS["shapes"].zeroshot_templates,
        "root": root,
    }


def _spread(xs: list[float]) -> str:
    """mean ± sample standard deviation (and the range) of top-1 fractions, in percent."""
    mean = statistics.fmean(xs)
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * sd:.1f} % ({100 * min(xs):.1f}..{100 * max(xs):.1f})"


def summarise(runs: list[dict], budgets: list[float]) -> dict:
    """The headline table: navit-clip at 36 tokens per image (open_clip's 96 x 96 / 16^2: equal
    inference compute) and native, against open_clip, per budget; with several seeds, the means and
    their spread, and the ratio of the means."""
    out = {}
    print(
        f"\n{'budget':>8} {'navit@36':>9} {'navit native':>13} {'open_clip':>10} {'ratio@36':>9} {'ratio native':>13}"
    )
    for b in budgets:
        key = f"at_{b:.0f}s"
        ours = [r[f"navit_{key}"]["top1_36"] for r in runs]
        native = [r[f"navit_{key}"]["top1_native"] for r in runs]
        peer = [max(r[f"openclip_{key}"]["top1_96px"], 1e-9) for r in runs]
        m_ours, m_native, m_peer = (statistics.fmean(x) for x in (ours, native, peer))
        out[f"ratio_top1_navit_over_openclip_{b:.0f}s"] = round(m_ours / m_peer, 3)
        out[f"ratio_top1_native_navit_over_openclip_{b:.0f}s"] = round(m_native / m_peer, 3)
        print(
            f"{b:7.0f}s {100 * m_ours:8.1f}% {100 * m_native:12.1f}% {100 * m_peer:9.1f}% "
            f"{m_ours / m_peer:9.2f} {m_native / m_peer:13.2f}"
        )
        if len(runs) > 1:
            out[f"navit_top1_36_{key}"] = ours
            out[f"openclip_top1_96px_{key}"] = peer
            print(f"{'':9}navit@36 {_spread(ours)}; open_clip {_spread(peer)}; {len(runs)} seeds")
    last = [r[f"navit_at_{budgets[-1]:.0f}s"] for r in runs]
    keys = [k for k in last[0] if k.startswith("top1_")]
    print(
        "navit-clip top-1 by tokens per image at the last budget"
        + (f" (mean of {len(runs)} seeds)" if len(runs) > 1 else "")
        + ": "
        + ", ".join(f"{k[5:]} {100 * statistics.fmean(r[k] for r in last):.1f}%" for k in keys)
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="90,180", help="training seconds at which both are evaluated")
    ap.add_argument("--only", choices=("navit", "openclip"), help="run one side (ablations)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--task", choices=("shapes", "digits"), default="shapes", help="the dataset (see above)")
    ap.add_argument(
        "--data", help="where the task's data is generated (default bench/results/race_data[_digits])"
    )
    ap.add_argument("--name", help="results file name (default learning_race[_digits])")
    ap.add_argument(
        "--seeds",
        default="0",
        help="comma-separated seeds: each is a full race (model init and data order on both sides); "
        "with several, the table gives means, their spread, and the ratio of the means",
    )
    ap.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="both sides train in it (evaluation in float32); auto: bf16 autocast where the device "
        "multiplies bf16 natively (a CPU with AMX, CUDA), else fp32",
    )
    ap.add_argument(
        "--openclip-precision",
        choices=("auto", "same", "fp32", "bf16"),
        default="auto",
        help="open_clip's precision; auto: fp32 on CPU (its best here: bf16 gave it no more steps and "
        "7.6 points less at 90 s, bench/NOTES.md), navit-clip's elsewhere",
    )
    ap.add_argument("--save", help="write navit-clip's final weights here (a checkpoint for navit-clip eval)")
    ap.add_argument("overrides", nargs="*", help="navit-clip config overrides (section.key=value)")
    args = ap.parse_args()
    random.seed(0)
    budgets = sorted(float(b) for b in args.budgets.split(","))
    device = torch.device(args.device)
    precision = resolve_precision(args.precision, device)
    oc_precision = {"same": precision, "auto": "fp32" if device.type == "cpu" else precision}.get(
        args.openclip_precision, args.openclip_precision
    )
    t0 = time.perf_counter()
    data = race_data(args.task, args.data)
    print(
        f"{args.task} data in {data['root']} ({time.perf_counter() - t0:.0f}s); budgets {budgets} s on {device}, "
        f"navit-clip in {precision}, open_clip in {oc_precision}"
    )
    seeds = [int(x) for x in args.seeds.split(",")]
    results: dict = {
        "task": args.task,
        "budgets_s": budgets,
        "device": str(device),
        "precision": precision,
        "openclip_precision": oc_precision,
        "navit_overrides": args.overrides,
        "seeds": seeds,
    }
    runs = []
    for seed in seeds:
        if len(seeds) > 1:
            print(f"\n=== seed {seed} ===")
        run = {}
        if args.only != "openclip":
            nav = run_navit(data, budgets, args.overrides, device, args.save, seed, precision)
            run.update({f"navit_{k}": v for k, v in nav.items()})
        if args.only != "navit":
            oc = run_openclip(data, budgets, SHARED["grad_clip"], device, seed, oc_precision)
            run.update({f"openclip_{k}": v for k, v in oc.items()})
        runs.append(run)
    results.update(runs[0] if len(runs) == 1 else {"runs": runs})
    if args.only is None:
        results.update(summarise(runs, budgets))
    elif len(runs) > 1:
        side = "navit" if args.only == "navit" else "openclip"
        metric = "top1_36" if side == "navit" else "top1_96px"
        for b in budgets:
            xs = [r[f"{side}_at_{b:.0f}s"][metric] for r in runs]
            print(f"{side} at {b:.0f}s, {metric}: {_spread(xs)} over seeds {seeds}")
    save_results(
        args.name or ("learning_race" if args.task == "shapes" else f"learning_race_{args.task}"), results
    )


if __name__ == "__main__":
    main()
