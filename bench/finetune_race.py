"""The fine-tune race: what converting an open_clip checkpoint to navit-clip buys, at equal wall-clock.

On the learning race's data and model size (bench/learning_race.py: the shape task and the real digit
scans, open_clip's ViT-Ti shape), a checkpoint is fine-tuned on a task it was not trained on (three
transfers: shapes -> digits, digits -> shapes, and shapes -> digits_es, the digit scans named and
captioned in Spanish, so that neither the class names nor the caption words are any the checkpoint's
text tower has read: bench/digits.py):
  0. "pretrained": open_clip's CLIP trains on the source task at its fixed 96 x 96 for `--pretrain`
     seconds (several minutes: a checkpoint good enough to lose accuracy), once; its weights are cached
     as an open_clip checkpoint (model-config .json + .safetensors, as a user owns one) in
     bench/results/finetune_race/ (outside git; rebuilt when missing or with --rebuild);
  then on the target task, each for `--budget` seconds (the learning race's clock), from that checkpoint:
  (a) `open_clip`: open_clip continues in its trainer's loop at its square 96 x 96 (resize + centre
     crop), batch 64;
  (c) `naflex`: open_clip main's `open_clip_train.main --use-naflex --pretrained CKPT` (the checkpoint's
     ViT converted to timm's NaFlexViT by open_clip main itself; sequence lengths 16 ... 256 sampled
     per batch, 2048 image tokens a batch), from the checkout `--openclip-src DIR` (skipped with one line
     when absent), run as the learning race runs it (bench/trainer_peers.py);
  (b) `navit-clip convert-openclip` of the same checkpoint continues with navit-clip's fine-tune recipe
     (model.init_from, configs/finetune_openclip.yaml's): native aspect ratios, longer side ~ U(72, 128)
     px around the checkpoint's 96 px, no token dropping, 8 packed sequences of 256 tokens a step.
All continue with the same optimiser settings (AdamW, lr `--lr`, betas (0.9, 0.98), eps 1e-6, weight
decay 0.1 on weight matrices, 20 warm-up steps, then a cosine over the budget).
Evaluation, zero-shot on the target task's held-out folder: the pretrained model, (a) and (b) by the same
code at native size (longer side up to 192 px) and at 16 ... 256 tokens per image, aspect kept (open_clip's
models through their exact conversion: open_clip's model with its position table resampled to each
image's grid by timm's rule, tests/test_openclip.py); (c) in open_clip main with timm's NaFlex eval
transform at each budget, its "native" being its own default evaluation (the largest sequence length,
256 tokens). The checkpoint's own count (96 x 96 / 16^2 = 36 tokens) is marked; each transfer ends with
navit-clip's ratio to the best peer at that count, at native size and at its worst budget.

`--shape siglip` races a SigLIP-shaped checkpoint instead (bench/siglip_shape.py: open_clip's CustomTextCLIP
with a timm ViT-Ti tower, no class token, MAP head, a bidirectional text tower pooled at its last position,
sigmoid loss with a learned bias): it pretrains with open_clip's SigLipLoss, (a) continues with it, (c)
adds `--siglip`, (b) converts it (the timm-tower conversion) and continues with navit-clip's sigmoid loss
(the checkpoint's, carried by model.init_from); its caches and results are apart (`*_siglip`).

    python bench/finetune_race.py --openclip-src DIR    -> bench/results/finetune_race.json (3 seeds, 3 transfers)
    python bench/finetune_race.py --shape siglip --openclip-src DIR   -> bench/results/finetune_race_siglip.json
    python bench/finetune_race.py --transfer shapes:digits --seeds 0 --budget 60
    python bench/finetune_race.py --only-navit data.token_drop.kind=none      (an ablation of (b))
    python bench/finetune_race.py --seeds 0 --wise-ft 0.3,0.5,0.7            (+ WiSE-FT of (b), evaluated)
    python bench/finetune_race.py --peer-lock-text 2 --openclip-src DIR   (the peers with the recipe's text lock)
Each seed's figures are saved (bench/results/finetune_race/SOURCE_to_TARGET_seedN/results.json) with the
settings they were made with: a rerun (or a killed race) reuses the peers' figures of every seed whose
settings match and reruns only what changed (navit-clip's recipe or overrides); `--rerun-navit` reruns
navit-clip's side and saves it (a change to navit-clip's code); `--rerun` runs all again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
from common import save_results
from learning_race import (
    BUDGET_TOKENS,
    NAVIT,
    NAVIT_TOKENS_PER_STEP,
    OPENCLIP_BATCH,
    OPENCLIP_CONFIG,
    SHARED,
    heldout_images,
    navit_zeroshot,
    race_data,
    run_navit,
    run_openclip,
)
from safetensors.torch import load_file, save_file
from siglip_shape import SIGLIP_CONFIG, build
from trainer_peers import check_openclip_src, naflex_zeroshot, run_trainer

from navit_clip.convert import convert_openclip, from_openclip
from navit_clip.factory import config_of, create_model
from navit_clip.tokenizer import tokenizer_for
from navit_clip.train import resolve_precision
from navit_clip.wiseft import wise_ft

ROOT = Path(__file__).resolve().parent.parent
WARMUP = 20
# navit-clip's fine-tune recipe (configs/finetune_openclip.yaml's, at this checkpoint's size): the
# pretraining recipe without its model (the architecture is the checkpoint's, model.init_from), no
# token dropping, and image sides sampled around the checkpoint's own 96 px (0.75x..1.33x: 72..128)
# instead of from 48 px (bench/NOTES.md: "fine-tune recipe"; at 36 tokens 0.70x -> 1.18x, one seed).
# Wider ranges (48..192, 72..160 and 72..192 truncated normal) were measured and lost a transfer
# (bench/NOTES.md, fifteenth round); a tail of 8 % of images drawn past the range, up to the largest
# evaluated budget's side (256 px: 256 tokens), buys the large budgets on both transfers and keeps the
# checkpoint's own (bench/NOTES.md, eighteenth round).
TRAINED_SIDE = OPENCLIP_CONFIG["vision_cfg"]["image_size"]
OWN_TOKENS = (TRAINED_SIDE // OPENCLIP_CONFIG["vision_cfg"]["patch_size"]) ** 2  # the checkpoint's own count
# the square side of the largest evaluated budget (256 tokens: 16 patches of 16 px), where the tail reaches
LARGEST_BUDGET_SIDE = round(math.sqrt(max(BUDGET_TOKENS))) * OPENCLIP_CONFIG["vision_cfg"]["patch_size"]
RECIPE = [o for o in NAVIT if not o.startswith(("model.", "tokenizer.", "data.resolution.schedule"))] + [
    "data.token_drop.kind=none",
    # run_navit lays NAVIT under these, so its small-images-first schedule must be undone here, not
    # only filtered out (it ran in the fine-tunes from 7164e0a to this line: bench/NOTES.md, 18th round)
    "data.resolution.schedule=[]",
    f"data.resolution.min_side={round(0.75 * TRAINED_SIDE)}",
    f"data.resolution.max_side={round(4 / 3 * TRAINED_SIDE)}",
    "data.resolution.reach_prob=0.08",
    f"data.resolution.reach_side={LARGEST_BUDGET_SIDE}",
    # the text tower trains whole (unlocked, the default): locking it but its last two groups read
    # better on shapes -> digits (twentieth round) but fell to 1.01x / 1.13x (own / native) on
    # shapes -> digits_es, whose Spanish names and captions no checkpoint has read, where unlocked read
    # 1.12x / 1.30x (bench/NOTES.md, twenty-sixth round: every option on every transfer)
]


SHAPES = {"clip": OPENCLIP_CONFIG, "siglip": SIGLIP_CONFIG}  # the checkpoint's open_clip model config
# What a shape's recipe adds to RECIPE. The sigmoid fine-tune: half the images sized to the checkpoint's
# own token count (its grid, aspect kept), the rest drawn from the side range with the tail twice as
# likely, so the tail keeps its 8 % of all images. SigLIP shapes -> digits, 3 seeds: own 0.97x -> 1.35x,
# native 1.08x -> 1.24x (5 seeds, every side in one hour: 1.32x / 1.34x, 256 tokens a tie); on the CLIP
# checkpoint it cost native 29.3 -> 25.7 %, so CLIP keeps the range (bench/NOTES.md, rounds 22-23).
SHAPE_RECIPE = {
    "clip": [],
    "siglip": [
        "data.resolution.budget_prob=0.5",
        f"data.resolution.tokens={OWN_TOKENS}",
        "data.resolution.reach_prob=0.16",
    ],
}


def peer_lock_flags(unlocked: int) -> list[str]:
    """open_clip_train's flags for the text lock of `--peer-lock-text` (its groups are the recipe's)."""
    return ["--lock-text", "--lock-text-unlocked-layers", str(unlocked), "--lock-text-freeze-layer-norm"]


def _apart(shape: str, peer_lock_text: int = 0) -> str:
    """The suffix keeping a shape's caches and results apart from the CLIP race's (which has none), and
    an ablation with the peers' text towers locked apart from the race as pasted."""
    return ("" if shape == "clip" else f"_{shape}") + (f"_peerlock{peer_lock_text}" if peer_lock_text else "")


def zeroshot_of_openclip(oc_model, data: dict, device, config: dict) -> dict:
    """An open_clip model's zero-shot at native size and every token budget, through its conversion."""
    navit, cfg = from_openclip(oc_model.cpu(), config, "open_clip ViT-Ti")
    oc_model.to(device)
    return navit_zeroshot(navit.to(device), tokenizer_for(cfg), cfg, data, device, BUDGET_TOKENS)


def pretrained(task: str, seconds: float, device, precision: str, rebuild: bool, shape: str) -> Path:
    """The cached source checkpoint: open_clip trained on `task` for `seconds` (seed 0), built if absent."""
    work = ROOT / "bench" / "results" / "finetune_race" / f"pretrained_{task}_{seconds:.0f}s{_apart(shape)}"
    if (work / "meta.json").exists() and not rebuild:
        meta = json.loads((work / "meta.json").read_text())
        print(f"== pretrained checkpoint (cached): {work} {meta}")
        return _learned(work, meta)
    print(f"== 0. open_clip ({shape}) pretrains on {task} at 96 x 96 for {seconds:.0f} s (cached in {work})")
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    oc = build(SHAPES[shape])
    pre = run_openclip(race_data(task, None), [seconds], 0.0, device, 0, precision, model=oc)
    (work / "vit-ti.json").write_text(json.dumps(SHAPES[shape]))
    save_file(
        {k: t.detach().cpu().contiguous() for k, t in oc.state_dict().items()},
        str(work / "pretrained.safetensors"),
    )
    meta = {"task": task, **pre[f"at_{seconds:.0f}s"]}
    (work / "meta.json").write_text(json.dumps(meta))
    return _learned(work, meta)


def _learned(work: Path, meta: dict) -> Path:
    """The checkpoint, if it learned its own task: one at chance has no accuracy to keep or lose, and a
    race from it would measure nothing (a SystemExit saying so)."""
    data = race_data(meta["task"], None)
    chance = 1 / len(Path(data["classnames"]).read_text().split())
    if meta["top1_96px"] < 2 * chance:
        raise SystemExit(
            f"the pretrained checkpoint {work} reads {100 * meta['top1_96px']:.1f} % on {meta['task']} (chance "
            f"{100 * chance:.0f} %), under twice chance after {meta['train_s']:.0f} s: too little learned to "
            "race from; pretrain longer (--pretrain) or fix its recipe, then --rebuild"
        )
    return work


def load_openclip(ckpt: Path, config: dict) -> torch.nn.Module:
    model = build(config)
    model.load_state_dict(load_file(str(ckpt / "pretrained.safetensors")))
    return model


def run_naflex(args, ckpt: Path, data: dict, seed: int, device, precision: str, name: str) -> dict:
    """(c): open_clip main's NaFlex fine-tune of the checkpoint, evaluated there at every budget."""
    hp = {**SHARED, "lr": args.lr, "warmup": WARMUP, "batch": OPENCLIP_BATCH, "workers": 1}
    hp["tokens_per_batch"] = NAVIT_TOKENS_PER_STEP
    config = SHAPES[args.shape]
    extra = [
        "--pretrained",
        str(ckpt / "pretrained.safetensors"),
        *(["--siglip"] if args.shape == "siglip" else []),
        *(peer_lock_flags(args.peer_lock_text) if args.peer_lock_text else []),
    ]
    weights = run_trainer(
        "naflex",
        config,
        data,
        [args.budget],
        seed,
        device,
        precision,
        hp,
        args.openclip_src,
        extra,
        name,
    )
    w = weights[args.budget]
    acc = naflex_zeroshot(args.openclip_src, config, w, data, heldout_images(data), BUDGET_TOKENS)
    acc["top1_native"] = acc[f"top1_{BUDGET_TOKENS[-1]}"]  # its own default: the largest sequence length
    return {k: v for k, v in w.items() if k != "state_dict"} | acc


def one_race(args, transfer: str, seed: int, device, precision: str, oc_precision: str) -> dict:
    """The peers, then (b), of one transfer and seed; every figure of it."""
    source, target = transfer.split(":")
    config = SHAPES[args.shape]
    ckpt = pretrained(source, args.pretrain, device, oc_precision, args.rebuild, args.shape)
    data = race_data(target, args.data)
    suffix = _apart(args.shape, args.peer_lock_text)
    work = ROOT / "bench" / "results" / "finetune_race" / f"{source}_to_{target}_seed{seed}{suffix}"
    work.mkdir(parents=True, exist_ok=True)
    saved = work / "results.json"
    done = json.loads(saved.read_text()) if saved.exists() else {}
    peers_saved = _matches(done, peer_settings(args)) and not args.rerun
    if (
        peers_saved
        and _matches(done, navit_settings(args))
        and not (args.only_navit or args.wise_ft or args.rerun_navit)
    ):
        print(f"== {transfer} seed {seed}: done with these settings, reused ({saved}; --rerun runs it again)")
        print(f"  {seed_figures(done)}")  # a paste of reused seeds still shows what each side read
        return done
    if args.only_navit and not peers_saved:
        raise SystemExit(f"--only-navit reuses the peers of {saved}: run the race with these settings first")
    if peers_saved:  # the peers' figures stand; navit-clip's recipe or overrides changed (or an ablation)
        print(f"== {transfer} seed {seed}: the peers' figures reused ({saved})")
        out = {k: v for k, v in done.items() if k not in ("settings", "navit")}
    else:
        out = {"pretrained": zeroshot_of_openclip(load_openclip(ckpt, config), data, device, config)}
        print(f"  {transfer} seed {seed}: pretrained checkpoint on {target}: {out['pretrained']}")
        print(f"== {transfer} seed {seed}: (a) open_clip continues at 96 x 96 for {args.budget:.0f} s")
        oc = load_openclip(ckpt, config)
        if args.peer_lock_text:  # open_clip_train's --lock-text, as (c) gets it
            oc.lock_text_tower(unlocked_layers=args.peer_lock_text)
        a = run_openclip(data, [args.budget], 0.0, device, seed + 1, oc_precision, oc, args.lr, WARMUP)
        out["openclip"] = {**a[f"at_{args.budget:.0f}s"], **zeroshot_of_openclip(oc, data, device, config)}
        if args.openclip_src:
            print(f"== {transfer} seed {seed}: (c) open_clip main's NaFlex fine-tune for {args.budget:.0f} s")
            name = f"finetune_{source}_to_{target}_seed{seed}{suffix}"
            out["naflex"] = run_naflex(args, ckpt, data, seed + 1, device, oc_precision, name)
    print(
        f"== {transfer} seed {seed}: (b) navit-clip continues from the converted checkpoint for {args.budget:.0f} s"
    )
    converted = convert_openclip(
        str(ckpt / "vit-ti.json"), ckpt / "pretrained.safetensors", work / "converted.pt"
    )
    overrides = [
        *RECIPE,
        *SHAPE_RECIPE[args.shape],
        f"model.init_from={converted}",
        f"train.lr={args.lr}",
        f"train.warmup={WARMUP}",
    ]
    finetuned = work / "finetuned.pt"
    b = run_navit(
        data, [args.budget], overrides + args.overrides, device, str(finetuned), seed + 1, precision
    )
    out["navit"] = b[f"at_{args.budget:.0f}s"]
    for alpha in args.wise_ft:  # WiSE-FT of (b) with the converted start: `navit-clip wise-ft`, evaluated
        mixed = wise_ft(converted, finetuned, work / f"wise_{alpha:g}.pt", alpha)
        cfg = config_of(mixed)
        tok = tokenizer_for(cfg, fixed_vocab=True)
        out[f"wise_{alpha:g}"] = navit_zeroshot(
            create_model(mixed, device), tok, cfg, data, device, BUDGET_TOKENS
        )
        print(f"  wise-ft alpha {alpha:g}: {out[f'wise_{alpha:g}']}")
    if not args.only_navit:  # written whole once both sides are done: a killed race resumes at this seed
        tmp = saved.with_suffix(".tmp")
        tmp.write_text(json.dumps({"settings": peer_settings(args) | navit_settings(args), **out}))
        tmp.replace(saved)
    return out


def peer_settings(args) -> dict:
    """What the saved peers' figures of a seed depend on besides the seed (reused only if they match)."""
    return {
        "pretrain_s": args.pretrain,
        "budget_s": args.budget,
        "lr": args.lr,
        "openclip_src": args.openclip_src,
        **({"peer_lock_text": args.peer_lock_text} if args.peer_lock_text else {}),
    }


def navit_settings(args) -> dict:
    """What the saved navit-clip figures depend on besides those: the recipe and the run's overrides."""
    return {"recipe": RECIPE + SHAPE_RECIPE[args.shape], "navit_overrides": args.overrides}


def _matches(done: dict, settings: dict) -> bool:
    return all(done.get("settings", {}).get(k, "?") == v for k, v in settings.items())


def _top1(side: dict, k: str) -> float:
    """A side's top-1 at budget `k`. At the checkpoint's own count, a side evaluated with open_clip's
    own val transform (square, TRAINED_SIDE px: the same tokens) counts the better of the two, which
    favours the peer: that is how its users evaluate it."""
    x = side[f"top1_{k}"]
    return max(x, side.get(f"top1_{TRAINED_SIDE}px", 0.0)) if k == str(OWN_TOKENS) else x


def seed_figures(done: dict) -> str:
    """One seed's saved sides in a line: steps, top-1 at the checkpoint's own count and at native size."""
    return "; ".join(
        f"{side} {done[side]['steps']} steps, {100 * _top1(done[side], str(OWN_TOKENS)):.1f} % at "
        f"{OWN_TOKENS}* tokens, {100 * done[side]['top1_native']:.1f} % native"
        for side in ("openclip", "naflex", "navit")
        if side in done
    )


def summarise(transfer: str, runs: list[dict], sides: list[str], results: dict) -> None:
    """One transfer's table (means of the seeds, min..max) and its verdict against the best peer."""
    own = str(OWN_TOKENS)
    peers = [p for p in ("openclip", "naflex") if p in sides]
    print(
        f"\n{transfer}: zero-shot top-1 on {transfer.split(':')[1]}, mean of {len(runs)} seed(s) (min..max)"
    )
    print(
        f"{'tokens/image':>13}"
        + "".join(f" {name:>17}" for name in sides)
        + f" {'best peer':>10} {'ratio':>6}"
    )
    ratios = {}
    for k in ["native", *map(str, BUDGET_TOKENS)]:
        cells, means = [], {}
        for side in sides:
            xs = [_top1(r[side], k) for r in runs]
            means[side] = statistics.fmean(xs)
            cells.append(f"{100 * means[side]:5.1f} ({100 * min(xs):4.1f}..{100 * max(xs):4.1f})")
            results[f"{transfer}_{side}_top1_{k}"] = round(means[side], 4)
        best = max(peers, key=lambda p: means[p])
        ratios[k] = (means["navit"] / max(means[best], 1e-9), best)
        results[f"{transfer}_ratio_navit_over_best_{k}"] = round(ratios[k][0], 3)
        mark = "*" if k == own else " "
        print(f"{k + mark:>13} " + " ".join(f"{c:>17}" for c in cells) + f" {best:>10} {ratios[k][0]:6.2f}")
    worst = min(map(str, BUDGET_TOKENS), key=lambda k: ratios[k][0])
    print(
        f"verdict {transfer}: own {own} tokens {ratios[own][0]:.2f}x vs {ratios[own][1]}; native "
        f"{ratios['native'][0]:.2f}x vs {ratios['native'][1]}; worst budget {worst} tokens {ratios[worst][0]:.2f}x "
        f"vs {ratios[worst][1]} (* the checkpoint's own count)"
    )
    print(f"  (open_clip at {own}*: the better of that budget and its own {TRAINED_SIDE} px val transform)")
    steps = {
        side: statistics.fmean(r[side]["steps"] for r in runs) for side in ("openclip", "navit", *peers[1:])
    }
    print("steps (mean): " + ", ".join(f"{side} {n:.0f}" for side, n in steps.items()))


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    precision = resolve_precision("auto", device)
    oc_precision = "fp32" if device.type == "cpu" else precision  # open_clip's best on CPU (learning_race)
    if args.openclip_src:
        args.openclip_src = check_openclip_src(args.openclip_src)
    else:
        check_openclip_src(None)
    seeds = [int(x) for x in args.seeds.split(",")]
    transfers = [t for t in args.transfer.split(",") if t]
    t_start = time.perf_counter()
    results: dict = {
        "shape": args.shape,
        "pretrain_s": args.pretrain,
        "budget_s": args.budget,
        "lr": args.lr,
        "seeds": seeds,
        "transfers": transfers,
        "navit_overrides": args.overrides,
        "wise_ft_alphas": args.wise_ft,
        "openclip_src": args.openclip_src,
        "peer_lock_text": args.peer_lock_text,
    }
    for transfer in transfers:
        runs = [one_race(args, transfer, seed, device, precision, oc_precision) for seed in seeds]
        results[f"{transfer}_runs"] = runs
        sides = ["pretrained", "openclip", *(["naflex"] if "naflex" in runs[0] else []), "navit"]
        summarise(transfer, runs, sides + [f"wise_{a:g}" for a in args.wise_ft], results)
    print(f"({time.perf_counter() - t_start:.0f} s in all)")
    name = "finetune_race" + _apart(args.shape, args.peer_lock_text)
    save_results(f"{name}_ablation" if args.only_navit else name, results)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrain", type=float, default=300.0, help="seconds of open_clip pretraining (cached)")
    ap.add_argument("--rebuild", action="store_true", help="pretrain again even if the checkpoint is cached")
    ap.add_argument(
        "--rerun", action="store_true", help="race every seed again, even those saved with the same settings"
    )
    ap.add_argument(
        "--rerun-navit",
        action="store_true",
        help="run navit-clip's side of every seed again, the saved peers reused, and save it (after a change "
        "to navit-clip's code that its recipe's settings do not show)",
    )
    ap.add_argument(
        "--shape",
        choices=tuple(SHAPES),
        default="clip",
        help="the checkpoint: open_clip's CLIP ViT-Ti, or SigLIP-shaped (bench/siglip_shape.py: timm tower, "
        "MAP head, sigmoid loss)",
    )
    ap.add_argument("--budget", type=float, default=90.0, help="seconds each side fine-tunes")
    ap.add_argument("--lr", type=float, default=2e-4, help="the fine-tuning peak learning rate, every side")
    ap.add_argument(
        "--transfer",
        default="shapes:digits,digits:shapes,shapes:digits_es",
        help="comma-separated source:target tasks (shapes, digits, digits_es: the digit scans named and "
        "captioned in Spanish, words no checkpoint has read): pretrained on one, fine-tuned on the other",
    )
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated: the fine-tunes of each transfer")
    ap.add_argument(
        "--openclip-src",
        default=os.environ.get("OPENCLIP_SRC"),
        help="an open_clip main checkout for the NaFlex peer (default $OPENCLIP_SRC; skipped without)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--data", help="where the target task is generated (default bench/results/race_data[_digits])"
    )
    ap.add_argument(
        "--only-navit",
        action="store_true",
        help="ablations: reuse each seed's last peer figures (and the cached checkpoint), rerun (b) only",
    )
    ap.add_argument(
        "--wise-ft",
        default="",
        type=lambda text: [float(a) for a in text.split(",") if a],
        help="comma-separated alphas: also evaluate (b) weight-space ensembled with its start (navit-clip wise-ft)",
    )
    ap.add_argument(
        "--peer-lock-text",
        type=int,
        default=0,
        metavar="N",
        help="an ablation: both peers lock their text tower but its last N groups (open_clip_train's "
        "--lock-text --lock-text-unlocked-layers N; the recipe's lock is N = 2), cached and written apart",
    )
    ap.add_argument("overrides", nargs="*", help="navit-clip config overrides for (b), section.key=value")
    return ap.parse_args()


if __name__ == "__main__":
    main()
