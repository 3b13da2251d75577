"""The learning race: zero-shot top-1 of navit-clip and three open_clip peers after equal wall-clock training.

All learn the same shape-only task (navit_clip/data/demo.py: ten shapes in random colours, sizes,
aspect ratios 1:2..2:1 and positions; only the shape decides the class), from the same webdataset
shards, at the same size (open_clip's ViT-Ti shape: vision width 192, depth 6, 3 heads, patch 16;
text width 192, depth 4, 3 heads, context 32; embed 256) with the same optimiser settings (AdamW,
lr 5e-4, betas (0.9, 0.98), eps 1e-6, weight decay 0.1 on weight matrices, 60 warm-up steps, then
a cosine over the wall-clock budget; no gradient clipping, open_clip's default), one data worker
each, one after the other:
  - navit-clip with the NaViT recipe: native aspect ratio, longer side ~ U(48, 128) px (U(48, 80) for
    the first 60 steps, widening to 128 px by step 120: small images first), Beta token dropping
    (mean 0.25), 8 packed sequences of 256 tokens per step, through its own data pipeline,
    model, loss and the defaults of navit_clip's configs (anything a user does not set);
  - `plain`: open_clip's own `CLIP` model (96 x 96 px, 36 tokens) and `ClipLoss` in a plain loop in
    this process, batch 64 (about as many tokens per step), its own train / val transforms;
  - `openclip_train`: `python -m open_clip_train.main` of the installed release in a subprocess, as
    users run it (webdataset loader, `--dataset-resampled`, `--workers 1`, batch 64), the same model
    config; evaluated with open_clip's val transform (96 x 96);
  - `naflex`: open_clip main's `--use-naflex` (the same ViT-Ti converted to timm's NaFlexViT, one image
    a row, padded; `--naflex-seq-lens 16 36 64 144 256`, 2048 image tokens a batch as ours), from a
    checkout given as `--openclip-src DIR` (skipped with one line when absent); evaluated there with
    timm's NaFlex eval transform at 36 tokens (and 16 ... 256 at the last budget).
Both trainers run through bench/openclip_launch.py (bench/trainer_peers.py builds their command lines,
printed): their cosine runs over the wall-clock budget as everyone's, their weights are taken at each
budget. The clock is counted the same way on every side: from the moment the side starts building
its model and data (imports done) to its last optimiser step, data loading included; it stops while
weights are evaluated (or written, for the trainers).
Each trains in its best precision on the device: navit-clip in `--precision` (default auto: bf16
autocast where the device multiplies bf16 natively, a CPU with AMX or a GPU, else float32), the peers
in `--openclip-precision` (default auto: float32 on CPU, where open_clip's bf16 autocast, as
open_clip_train runs `--precision amp_bf16`, gained it no steps and lost it 7.6 points at 90 s;
navit-clip's precision elsewhere). All evaluate in float32.
At each budget all are evaluated zero-shot on the same held-out image folder; navit-clip at 36 tokens
per image (aspect kept; the headline ratio against the best peer, equal inference compute), at native
resolution and, at the last budget, at several token budgets. The last lines give the lead as time (when
navit-clip's mean first reaches the best peer's top-1 at the last budget, between the budgets read:
`--budgets 60,90,120,180` reads it finer), each side's images/s, image tokens/s and padding fraction.

    python bench/learning_race.py --openclip-src DIR           -> bench/results/learning_race.json
    python bench/learning_race.py --budgets 60,120 --only navit model.vision.pool=mean   (an ablation)
    python bench/learning_race.py --seeds 0,1,2              (three races; means and spread)
    python bench/learning_race.py --peers plain               (one peer: today's loop, as before 2026-12)
    python bench/learning_race.py --device cuda
    python bench/learning_race.py --task digits            (real scans: bench/digits.py)
    python bench/learning_race.py --task digits --show     (a saved race's summary again, nothing trained)
A race saves every side's figures with the settings the peers ran with (bench/results/NAME.json): a rerun
whose peer settings match (task, budgets, device, peers and their flags, precision, open_clip checkout)
reuses each seed's saved peer figures, says so, and runs navit-clip only (a recipe change is measured
beside the same peers, on the same machine); `--rerun` runs every side again.
The peers and the digits need the bench extra: pip install -e ".[bench]".
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import time
from pathlib import Path

import open_clip
import torch
import webdataset as wds
from common import load_results, save_results
from open_clip.loss import ClipLoss, SigLipLoss
from PIL import Image
from safetensors.torch import save_file
from trainer_peers import check_openclip_src, naflex_zeroshot, run_trainer

from navit_clip.checkpoint import load_weights
from navit_clip.config import load_config, to_dict
from navit_clip.data.demo import TASKS, ensure_demo_data
from navit_clip.data.pipeline import PackedImageText, folder_files, make_loader
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
    # small images first (CLIPA's inverse scaling, progressive resizing): sides up to 80 px for the first
    # 60 steps (about 200 images a step instead of 110), widening to the full 48..128 by step 120
    # (bench/NOTES.md, seventeenth round: 29.6 -> 46.0 % at 90 s on shapes, seed 0; digits unchanged)
    "data.resolution.schedule=[[0,80],[60,80],[120,128]]",
    "data.token_drop.kind=beta",
    "data.token_drop.rate=0.25",
    f"train.lr={SHARED['lr']}",
    f"train.weight_decay={SHARED['weight_decay']}",
    f"train.warmup={SHARED['warmup']}",
    f"train.grad_clip={SHARED['grad_clip']}",
]
OPENCLIP_BATCH, OPENCLIP_SIZE = 64, 96
NAVIT_TOKENS_PER_STEP = 8 * 256  # data.batch_seqs x data.seq_len: the NaFlex peer's token budget a batch
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


def race(
    name: str, step_fn, eval_fn, budgets: list[float], started: float, totals=dict, log_every: int = 20
) -> dict:
    """Train with `step_fn(step) -> dict of curves` until each budget, evaluating there. The clock counts
    from `started` (perf_counter when the side began building its model and data) and stops while
    evaluating: the rule bench/openclip_launch.py applies to open_clip's trainers. `totals()`: counts
    (images, tokens) recorded with each budget's figures."""
    out: dict = {"curve": []}
    elapsed, step = time.perf_counter() - started, 0
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
        out[f"at_{budget:.0f}s"] = {"steps": step, "train_s": round(elapsed, 2), **totals(), **acc}
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
    started = time.perf_counter()
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

    counts = {"images": 0, "image_tokens": 0, "token_slots": 0}  # slots: tokens + padding

    def step_fn(step: int, elapsed: float) -> dict:
        sched.set(step, elapsed)
        batch = next(batches).to(device)
        counts["images"] += batch.stats["images"]
        counts["image_tokens"] += batch.stats["tokens"]
        counts["token_slots"] += batch.images.patches.shape[0] * batch.images.patches.shape[1]
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

    result = race("navit", step_fn, eval_fn, budgets, started, lambda: dict(counts))
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
        wds.ResampledShards(data["train"], worker_seed=lambda: seed, deterministic=True),  # any webdataset
        wds.tarfile_to_samples(),
        wds.shuffle(500, initial=250, rng=random.Random(seed)),
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
    """open_clip's model and loss in its trainer's loop; `model`: start from it (trained in place). A
    model with a logit bias (SigLIP's) trains with open_clip's `SigLipLoss`, as `--siglip` does."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = (model if model is not None else open_clip.CLIP(**OPENCLIP_CONFIG)).to(device)
    train_tf = open_clip.image_transform(OPENCLIP_SIZE, is_train=True)
    val_tf = open_clip.image_transform(OPENCLIP_SIZE, is_train=False)
    tok = open_clip.get_tokenizer("ViT-B-32", context_length=32)
    opt = openclip_optimizer(model, lr)
    sched = Schedule(opt, warmup, budgets[-1])
    loss_fn = SigLipLoss() if getattr(model, "logit_bias", None) is not None else ClipLoss()
    autocast = autocast_for(precision, device)
    batches = openclip_batches(data, seed, train_tf, tok)

    counts = {"images": 0, "image_tokens": 0, "token_slots": 0}
    per_image = (OPENCLIP_SIZE // OPENCLIP_CONFIG["vision_cfg"]["patch_size"]) ** 2

    def step_fn(step: int, elapsed: float) -> dict:
        sched.set(step, elapsed)
        images, texts = next(batches)
        counts["images"] += len(images)
        counts["image_tokens"] += len(images) * per_image
        counts["token_slots"] += len(images) * per_image
        with autocast:  # forward and loss, as open_clip_train runs them under --precision amp_bf16
            # (image features, text features, logit scale[, logit bias]): the loss's own arguments
            loss = loss_fn(*model(images.to(device), texts.to(device)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        return {"loss": loss.item(), "grad_norm": norm.item(), "logit_scale": model.logit_scale.exp().item()}

    def eval_fn(last: bool) -> dict:
        return {"top1_96px": openclip_zeroshot(model, tok, val_tf, data, device)}

    return race("open_clip", step_fn, eval_fn, budgets, started, lambda: dict(counts))


@torch.no_grad()
def openclip_zeroshot(model, tok, val_tf, data: dict, device) -> float:
    """open_clip's zero-shot top-1 on the held-out folder: its val transform (96 x 96), open_clip's
    own classifier recipe (templates averaged, normalised); the model is left in train mode."""
    model.eval()
    classnames = Path(data["classnames"]).read_text().split()
    classifier = build_classifier(model, tok, classnames, list(data["templates"]), device)
    correct, n = 0, 0
    for chunk in _chunks(heldout_images(data), 128):
        ims = torch.stack([val_tf(Image.open(path).convert("RGB")) for path, _ in chunk])
        emb = model.encode_image(ims.to(device), normalize=True)
        labels = torch.tensor([label for _, label in chunk], device=device)
        correct, n = correct + int(((emb @ classifier).argmax(1) == labels).sum()), n + len(chunk)
    model.train()
    return round(correct / n, 4)


def heldout_images(data: dict) -> list[list]:
    """[path, label] of every held-out image, in navit-clip's folder order (labels as its classnames)."""
    return [[str(path), label] for label, path in folder_files(data["heldout_folder"])]


def _chunks(xs: list, n: int):
    for i in range(0, len(xs), n):
        yield xs[i : i + n]


def race_data(task: str, root: str | None) -> dict:
    """The task's generated shards, held-out folder, class names and zero-shot templates."""
    if task in ("digits", "digits_es"):
        import digits

        spanish = task == "digits_es"
        templates = digits.ZEROSHOT_TEMPLATES_ES if spanish else digits.ZEROSHOT_TEMPLATES
        root = root or str(ROOT / "bench" / "results" / f"race_data_{task}")
        return {**digits.ensure_digit_data(root, spanish=spanish), "templates": templates, "root": root}
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


PEERS = ("plain", "openclip_train", "naflex")
PEER_METRIC = {"plain": "top1_96px", "openclip_train": "top1_96px", "naflex": "top1_36"}  # 36 tokens each


def run_peers(
    data: dict, budgets: list[float], peers: list[str], seed: int, device, precision: str, src, peer_args
) -> dict:
    """Each peer's results at each budget, keyed f"{peer}_at_{budget}s" (and its curve)."""
    run: dict = {}
    for peer in peers:
        if peer == "plain":
            result = run_openclip(data, budgets, SHARED["grad_clip"], device, seed, precision)
        else:
            result = run_trainer_peer(peer, data, budgets, seed, device, precision, src, peer_args)
        run.update({f"{peer}_{k}": v for k, v in result.items()})
    return run


def run_trainer_peer(
    peer: str, data: dict, budgets: list[float], seed: int, device, precision: str, src, peer_args: dict
) -> dict:
    """open_clip_train.main (the release, or open_clip main's --use-naflex) to each budget, then its
    checkpoints evaluated: the release's with open_clip's val transform, NaFlex's at each token budget."""
    hp = {**SHARED, "batch": OPENCLIP_BATCH, "workers": 1, "tokens_per_batch": NAVIT_TOKENS_PER_STEP}
    extra = list(peer_args.get(peer, []))  # a trainer's own flags for this run; its last flag wins
    if peer == "naflex":  # open_clip's own ViT-Ti init, converted by open_clip main (timm's learns slower)
        init = ROOT / "bench" / "results" / "peers" / f"init_seed{seed}.safetensors"
        extra += ["--pretrained", openclip_init(seed, init)]
    weights = run_trainer(peer, OPENCLIP_CONFIG, data, budgets, seed, device, precision, hp, src, extra)
    out: dict = {}
    for b in budgets:
        t0 = time.perf_counter()
        if peer == "naflex":
            tokens = BUDGET_TOKENS if b == budgets[-1] else (36,)
            acc = naflex_zeroshot(src, OPENCLIP_CONFIG, weights[b], data, heldout_images(data), tokens)
        else:
            model = open_clip.CLIP(**OPENCLIP_CONFIG)
            model.load_state_dict(weights[b]["state_dict"])
            tok = open_clip.get_tokenizer("ViT-B-32", context_length=32)
            val_tf = open_clip.image_transform(OPENCLIP_SIZE, is_train=False)
            acc = {"top1_96px": openclip_zeroshot(model.to(device), tok, val_tf, data, device)}
        print(
            f"  {peer} at {b:.0f}s ({weights[b]['steps']} steps): {acc} (eval {time.perf_counter() - t0:.0f}s)"
        )
        out[f"at_{b:.0f}s"] = {k: v for k, v in weights[b].items() if k != "state_dict"} | acc
    return out


def openclip_init(seed: int, path: Path) -> str:
    """open_clip's CLIP at the race's ViT-Ti shape as `plain` starts it (seeded), written as a checkpoint."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(**OPENCLIP_CONFIG)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: t.detach().contiguous() for k, t in model.state_dict().items()}, str(path))
    return str(path)


def side_mean(runs: list[dict], side: str, budget: float) -> float:
    """A side's mean top-1 over seeds at a budget: navit-clip (and NaFlex) at 36 tokens, open_clip at 96 px."""
    return statistics.fmean(r[f"{side}_at_{budget:.0f}s"][PEER_METRIC.get(side, "top1_36")] for r in runs)


def summarise(runs: list[dict], budgets: list[float]) -> dict:
    """The headline: navit-clip at 36 tokens per image (open_clip's 96 x 96 / 16^2, NaFlex's 36-token
    budget: equal inference compute) and native, against each peer and the best of them, per budget;
    with several seeds, means, their spread, and the ratio of the means."""
    out = {}
    peers = [p for p in PEERS if f"{p}_at_{budgets[0]:.0f}s" in runs[0]]
    print(f"\n{'budget':>8} {'navit@36':>9} {'native':>7} " + " ".join(f"{p:>15}" for p in peers))
    for b in budgets:
        key = f"at_{b:.0f}s"
        ours = [r[f"navit_{key}"]["top1_36"] for r in runs]
        native = [r[f"navit_{key}"]["top1_native"] for r in runs]
        means = {p: max(side_mean(runs, p, b), 1e-9) for p in peers}
        best = max(means, key=means.get)
        m_ours, m_native = statistics.fmean(ours), statistics.fmean(native)
        print(
            f"{b:7.0f}s {100 * m_ours:8.1f}% {100 * m_native:6.1f}% "
            + " ".join(f"{100 * means[p]:14.1f}%" for p in peers)
        )
        print(
            f"lead at {b:.0f}s: navit@36 {100 * m_ours:.1f} % vs best peer {best} {100 * means[best]:.1f} % "
            f"({m_ours / means[best]:.2f}x); native {m_native / means[best]:.2f}x"
        )
        out[f"best_peer_{b:.0f}s"] = best
        out[f"ratio_top1_navit_over_best_{b:.0f}s"] = round(m_ours / means[best], 3)
        out[f"ratio_top1_native_navit_over_best_{b:.0f}s"] = round(m_native / means[best], 3)
        for p in peers:
            out[f"ratio_top1_navit_over_{p}_{b:.0f}s"] = round(m_ours / means[p], 3)
        if len(runs) > 1:
            out[f"navit_top1_36_{key}"] = ours
            print(f"{'':9}navit@36 {_spread(ours)}; {len(runs)} seeds")
            for p in peers:
                xs = [r[f"{p}_{key}"][PEER_METRIC[p]] for r in runs]
                out[f"{p}_{PEER_METRIC[p]}_{key}"] = xs
                print(f"{'':9}{p} {_spread(xs)}")
    out.update(time_to_match(runs, budgets, peers))
    throughput(runs, budgets[-1], ["navit", *peers])
    for side in ["navit"] + [p for p in peers if p == "naflex"]:
        last = [r[f"{side}_at_{budgets[-1]:.0f}s"] for r in runs]
        keys = [k for k in last[0] if k.startswith("top1_")]
        print(
            f"{side} top-1 by tokens per image at the last budget"
            + (f" (mean of {len(runs)} seeds)" if len(runs) > 1 else "")
            + ": "
            + ", ".join(f"{k[5:]} {100 * statistics.fmean(r[k] for r in last):.1f}%" for k in keys)
        )
    return out


def time_to_match(runs: list[dict], budgets: list[float], peers: list[str]) -> dict:
    """The lead as time: when navit-clip's mean top-1 at 36 tokens first reaches what the best peer
    reads at the last budget T, linearly between the budgets read (the curve between reads is not
    measured, so more budgets give a finer figure). T / that time is how much less training time
    navit-clip needs for the peer's accuracy; nothing is printed past the last budget."""
    T = budgets[-1]
    best = max(peers, key=lambda p: side_mean(runs, p, T))
    target = side_mean(runs, best, T)
    curve = [(b, side_mean(runs, "navit", b)) for b in budgets]
    key, found = f"time_to_best_peer_{T:.0f}s", {"peer": best, "top1": round(target, 4)}
    if curve[0][1] >= target:
        print(
            f"time to {best}'s {T:.0f}s top-1 ({100 * target:.1f} %): navit@36 has it by its first budget "
            f"({curve[0][0]:.0f}s, {100 * curve[0][1]:.1f} %): >= {T / curve[0][0]:.2f}x less time"
        )
        return {key: {**found, "navit_s_at_most": curve[0][0]}}
    for (b0, a0), (b1, a1) in zip(curve, curve[1:]):
        if a1 >= target:
            t = b0 + (b1 - b0) * (target - a0) / (a1 - a0)
            print(
                f"time to {best}'s {T:.0f}s top-1 ({100 * target:.1f} %): navit@36 reaches it at {t:.0f}s, "
                f"between its reads at {b0:.0f}s ({100 * a0:.1f} %) and {b1:.0f}s ({100 * a1:.1f} %): "
                f"{T / t:.2f}x less time"
            )
            return {key: {**found, "navit_s": round(t, 1), "time_ratio": round(T / t, 3)}}
    print(f"time to {best}'s {T:.0f}s top-1 ({100 * target:.1f} %): navit@36 does not reach it by {T:.0f}s")
    return {key: {**found, "navit_s": None}}


def throughput(runs: list[dict], budget: float, sides: list[str]) -> None:
    """What each side fed its image tower by the last budget: images/s, image tokens/s and the
    fraction of token slots that were padding (mean over seeds)."""
    print(f"by {budget:.0f}s (mean of {len(runs)}): side, steps, images/s, image tokens/s, padding")
    for side in sides:
        at = [r[f"{side}_at_{budget:.0f}s"] for r in runs]
        if "image_tokens" not in at[0]:
            continue
        m = {
            k: statistics.fmean(a[k] for a in at)
            for k in ("steps", "train_s", "images", "image_tokens", "token_slots")
        }
        pad = 1 - m["image_tokens"] / max(m["token_slots"], 1)
        print(
            f"  {side:15} {m['steps']:6.0f} {m['images'] / m['train_s']:8.1f} "
            f"{m['image_tokens'] / m['train_s']:9.0f} {100 * pad:6.1f}%"
        )


def race_name(args: argparse.Namespace) -> str:
    return args.name or ("learning_race" if args.task == "shapes" else f"learning_race_{args.task}")


def show(name: str) -> None:
    """The summary of a saved race (its means, ratios and the lead as time), as its run printed it."""
    saved = load_results(name)
    if saved is None:
        raise SystemExit(f"--show: no saved race bench/results/{name}.json")
    runs = saved.get("runs") or [saved]
    if not saved["peers"] or f"navit_at_{saved['budgets_s'][0]:.0f}s" not in runs[0]:
        raise SystemExit(
            f"--show: bench/results/{name}.json holds one side only (an --only run); nothing to compare"
        )
    print(f"{name}: {saved['task']}, seeds {saved['seeds']}, navit-clip overrides {saved['navit_overrides']}")
    summarise(runs, saved["budgets_s"])


def main() -> None:
    args = parse_args()
    if args.show:
        return show(race_name(args))
    random.seed(0)
    budgets = sorted(float(b) for b in args.budgets.split(","))
    device = torch.device(args.device)
    precision = resolve_precision(args.precision, device)
    oc_precision = {"same": precision, "auto": "fp32" if device.type == "cpu" else precision}.get(
        args.openclip_precision, args.openclip_precision
    )
    peers = [] if args.only == "navit" else [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = set(peers) - set(PEERS)
    if unknown:
        raise SystemExit(f"--peers: unknown {sorted(unknown)}; choose from {', '.join(PEERS)}")
    if "naflex" in peers and check_openclip_src(args.openclip_src) is None:
        peers.remove("naflex")
    t0 = time.perf_counter()
    data = race_data(args.task, args.data)
    print(
        f"{args.task} data in {data['root']} ({time.perf_counter() - t0:.0f}s); budgets {budgets} s on {device}, "
        f"navit-clip in {precision}, peers {peers} in {oc_precision}"
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
        "peers": peers,
        "openclip_src": args.openclip_src if "naflex" in peers else None,
        "peer_args": {"openclip_train": args.openclip_train_args, "naflex": args.naflex_args},
    }
    name = race_name(args)
    saved = {} if args.rerun else saved_peers(name, results)
    runs = []
    for seed in seeds:
        if len(seeds) > 1:
            print(f"\n=== seed {seed} ===")
        run = {}
        if args.only != "openclip":
            nav = run_navit(data, budgets, args.overrides, device, args.save, seed, precision)
            run.update({f"navit_{k}": v for k, v in nav.items()})
        if seed in saved:
            print(
                f"  peers {peers}: seed {seed}'s figures reused (bench/results/{name}.json; --rerun runs them again)"
            )
            run.update(saved[seed])
        else:
            peer_args = {
                "openclip_train": args.openclip_train_args.split(),
                "naflex": args.naflex_args.split(),
            }
            run.update(
                run_peers(data, budgets, peers, seed, device, oc_precision, args.openclip_src, peer_args)
            )
        runs.append(run)
    results.update(runs[0] if len(runs) == 1 else {"runs": runs})
    if args.only is None and peers:
        results.update(summarise(runs, budgets))
    elif len(runs) > 1:
        for side in ["navit"] if args.only == "navit" else peers:
            metric = PEER_METRIC.get(side, "top1_36")
            for b in budgets:
                xs = [r[f"{side}_at_{b:.0f}s"][metric] for r in runs]
                print(f"{side} at {b:.0f}s, {metric}: {_spread(xs)} over seeds {seeds}")
    save_results(name, results)


PEER_SETTINGS = ("task", "budgets_s", "device", "openclip_precision", "peers", "openclip_src", "peer_args")


def saved_peers(name: str, settings: dict) -> dict[int, dict]:
    """{seed: its peers' saved figures} from the last race written to bench/results/NAME.json, if that
    race's peers ran with these settings (PEER_SETTINGS); else nothing."""
    last = load_results(name) if settings["peers"] else None
    if last is None or any(last.get(k) != settings[k] for k in PEER_SETTINGS):
        return {}
    runs = last.get("runs") or [last]
    keys = tuple(f"{peer}_" for peer in settings["peers"])
    return {
        seed: {k: v for k, v in run.items() if k.startswith(keys)}
        for seed, run in zip(last["seeds"], runs)
        if all(any(k.startswith(p) for k in run) for p in keys)
    }


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="90,180", help="training seconds at which both are evaluated")
    ap.add_argument("--only", choices=("navit", "openclip"), help="run navit-clip or the peers (ablations)")
    ap.add_argument(
        "--peers",
        default=",".join(PEERS),
        help="comma-separated: plain (open_clip's model and loss in a loop here), openclip_train (the "
        "release's trainer), naflex (open_clip main's --use-naflex, needs --openclip-src)",
    )
    ap.add_argument(
        "--openclip-src",
        default=os.environ.get("OPENCLIP_SRC"),
        help="an open_clip main checkout (2026-05 or later) for the naflex peer (default $OPENCLIP_SRC)",
    )
    for peer in ("openclip_train", "naflex"):
        ap.add_argument(
            f"--{peer.replace('_', '-')}-args",
            default="",
            help=f"more open_clip_train.main flags for the {peer} peer, after the race's (the last wins), "
            "e.g. '--lr 2.5e-4 --grad-clip-norm 1.0': to give a peer its best settings",
        )
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--task", choices=("shapes", "digits", "digits_es"), default="shapes", help="the dataset (see above)"
    )
    ap.add_argument(
        "--data", help="where the task's data is generated (default bench/results/race_data[_digits])"
    )
    ap.add_argument("--name", help="results file name (default learning_race[_digits])")
    ap.add_argument(
        "--seeds",
        default="0",
        help="comma-separated seeds: each is a full race (model init and data order on every side); "
        "with several, the table gives means, their spread, and the ratio of the means",
    )
    ap.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="navit-clip trains in it (evaluation in float32); auto: bf16 autocast where the device "
        "multiplies bf16 natively (a CPU with AMX, CUDA), else fp32",
    )
    ap.add_argument(
        "--openclip-precision",
        choices=("auto", "same", "fp32", "bf16"),
        default="auto",
        help="the peers' precision; auto: fp32 on CPU (its best here: bf16 gave it no more steps and "
        "7.6 points less at 90 s, bench/NOTES.md), navit-clip's elsewhere",
    )
    ap.add_argument(
        "--rerun",
        action="store_true",
        help="run the peers again even where figures with these settings are saved",
    )
    ap.add_argument(
        "--show",
        action="store_true",
        help="train nothing: print the summary of the race saved as bench/results/NAME.json",
    )
    ap.add_argument("--save", help="write navit-clip's final weights here (a checkpoint for navit-clip eval)")
    ap.add_argument("overrides", nargs="*", help="navit-clip config overrides (section.key=value)")
    return ap.parse_args()


if __name__ == "__main__":
    main()
