"""The fine-tune race: what converting an open_clip checkpoint to navit-clip buys, at equal wall-clock.

One run, on the shape task of the learning race (bench/learning_race.py: same data, same ViT-Ti-size
open_clip model, its own loop and loss):
  0. "pretrained": open_clip's CLIP trains at its fixed 96 x 96 for `--pretrain` seconds; its weights
     are written as an open_clip checkpoint (model-config .json + .safetensors), as a user owns one;
  (a) open_clip continues from that checkpoint for `--budget` seconds, as open_clip_train fine-tunes:
     square 96 x 96 images (resize + centre crop), batch 64;
  (b) `navit-clip convert-openclip` of the same checkpoint continues for the same `--budget` seconds
     with navit-clip's fine-tune recipe (model.init_from, configs/finetune_openclip.yaml's): native
     aspect ratios, longer side ~ U(72, 128) px around the checkpoint's 96 px, no token dropping,
     8 packed sequences of 256 tokens a step.
Both continue with the same optimiser settings (AdamW, lr `--lr`, betas (0.9, 0.98), eps 1e-6, weight
decay 0.1 on weight matrices, 20 warm-up steps, then a cosine over the budget).
All three models are evaluated zero-shot on the same held-out folder by the same code: at native size
(longer side up to 192 px) and at 16 ... 256 tokens per image, aspect kept. open_clip's models are
read there through their exact conversion, which is open_clip's model with its position table
resampled to each image's grid by timm's rule (tests/test_openclip.py): how an open_clip user runs a
checkpoint at another size. open_clip's own 96 x 96 centre-crop accuracy is printed beside it.

    python bench/finetune_race.py                       -> bench/results/finetune_race.json (3 seeds)
    python bench/finetune_race.py --seeds 0 --pretrain 120 --budget 60
    python bench/finetune_race.py --only-navit data.token_drop.kind=none      (an ablation of (b))
    python bench/finetune_race.py --seeds 0 --wise-ft 0.3,0.5,0.7            (+ WiSE-FT of (b), evaluated)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import open_clip
import torch
from common import save_results
from learning_race import (
    BUDGET_TOKENS,
    NAVIT,
    OPENCLIP_CONFIG,
    navit_zeroshot,
    race_data,
    run_navit,
    run_openclip,
)
from safetensors.torch import save_file

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
# instead of from 48 px (bench/NOTES.md: "fine-tune recipe"; at 36 tokens 0.70x -> 1.18x, one seed)
TRAINED_SIDE = OPENCLIP_CONFIG["vision_cfg"]["image_size"]
RECIPE = [o for o in NAVIT if not o.startswith(("model.", "tokenizer."))] + [
    "data.token_drop.kind=none",
    f"data.resolution.min_side={round(0.75 * TRAINED_SIDE)}",
    f"data.resolution.max_side={round(4 / 3 * TRAINED_SIDE)}",
]


def zeroshot_of_openclip(oc_model, data: dict, device) -> dict:
    """An open_clip model's zero-shot at native size and every token budget, through its conversion."""
    navit, cfg = from_openclip(oc_model.cpu(), OPENCLIP_CONFIG, "open_clip ViT-Ti")
    oc_model.to(device)
    return navit_zeroshot(navit.to(device), tokenizer_for(cfg), cfg, data, device, BUDGET_TOKENS)


def one_race(args, seed: int, data: dict, device, precision: str, oc_precision: str) -> dict:
    """Pretrain (or reuse, --only-navit), then (a) and (b); every figure of one seed."""
    work = ROOT / "bench" / "results" / "finetune_race" / f"seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    saved = work / "results.json"
    if args.only_navit:
        previous = json.loads(saved.read_text())
        out = {k: previous[k] for k in ("pretrained_top1_96px", "pretrained", "openclip")}
    else:
        print(f"== seed {seed}: 0. open_clip pretrains at 96 x 96 for {args.pretrain:.0f} s")
        torch.manual_seed(seed)
        oc = open_clip.CLIP(**OPENCLIP_CONFIG)
        pre = run_openclip(data, [args.pretrain], 0.0, device, seed, oc_precision, model=oc)
        out = {"pretrained_top1_96px": pre[f"at_{args.pretrain:.0f}s"]["top1_96px"]}
        (work / "vit-ti.json").write_text(json.dumps(OPENCLIP_CONFIG))
        weights = {k: t.detach().cpu().contiguous() for k, t in oc.state_dict().items()}
        save_file(weights, str(work / "pretrained.safetensors"))
        out["pretrained"] = zeroshot_of_openclip(oc, data, device)
        print(f"  pretrained checkpoint: {out['pretrained']}")

        print(f"== seed {seed}: (a) open_clip continues at 96 x 96 for {args.budget:.0f} s")
        oc.load_state_dict(weights)
        a = run_openclip(data, [args.budget], 0.0, device, seed + 1, oc_precision, oc, args.lr, WARMUP)
        out["openclip"] = {**a[f"at_{args.budget:.0f}s"], **zeroshot_of_openclip(oc, data, device)}

    print(f"== seed {seed}: (b) navit-clip continues from the converted checkpoint for {args.budget:.0f} s")
    converted = convert_openclip(
        str(work / "vit-ti.json"), work / "pretrained.safetensors", work / "converted.pt"
    )
    overrides = [*RECIPE, f"model.init_from={converted}", f"train.lr={args.lr}", f"train.warmup={WARMUP}"]
    finetuned = work / "finetuned.pt"
    b = run_navit(
        data, [args.budget], overrides + args.overrides, device, str(finetuned), seed + 1, precision
    )
    out["navit"] = b[f"at_{args.budget:.0f}s"]
    for alpha in args.wise_ft:  # WiSE-FT of (b) with the converted start: `navit-clip wise-ft`, evaluated
        mixed = wise_ft(converted, finetuned, work / f"wise_{alpha:g}.pt", alpha)
        cfg = config_of(mixed)
        model = create_model(mixed, device)
        tok = tokenizer_for(cfg, fixed_vocab=True)
        out[f"wise_{alpha:g}"] = navit_zeroshot(model, tok, cfg, data, device, BUDGET_TOKENS)
        print(f"  wise-ft alpha {alpha:g}: {out[f'wise_{alpha:g}']}")
    if not args.only_navit:
        saved.write_text(json.dumps(out))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrain", type=float, default=90.0, help="seconds of open_clip pretraining")
    ap.add_argument("--budget", type=float, default=90.0, help="seconds each side continues")
    ap.add_argument("--lr", type=float, default=2e-4, help="the fine-tuning peak learning rate, both sides")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated: a whole race each (pretraining too)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data", help="where the shape task is generated (default bench/results/race_data)")
    ap.add_argument(
        "--only-navit",
        action="store_true",
        help="ablations: reuse each seed's last pretrained checkpoint and open_clip figures, rerun (b) only",
    )
    ap.add_argument(
        "--wise-ft",
        default="",
        type=lambda text: [float(a) for a in text.split(",") if a],
        help="comma-separated alphas: also evaluate (b) weight-space ensembled with its start (navit-clip wise-ft)",
    )
    ap.add_argument("overrides", nargs="*", help="navit-clip config overrides for (b), section.key=value")
    args = ap.parse_args()
    device = torch.device(args.device)
    precision = resolve_precision("auto", device)
    oc_precision = "fp32" if device.type == "cpu" else precision  # open_clip's best on CPU (learning_race)
    data = race_data("shapes", args.data)
    seeds = [int(x) for x in args.seeds.split(",")]
    t_start = time.perf_counter()
    runs = [one_race(args, seed, data, device, precision, oc_precision) for seed in seeds]
    results: dict = {
        "pretrain_s": args.pretrain,
        "budget_s": args.budget,
        "lr": args.lr,
        "seeds": seeds,
        "navit_overrides": args.overrides,
        "wise_ft_alphas": args.wise_ft,
        "runs": runs,
    }
    print(
        f"\nzero-shot top-1 after {args.pretrain:.0f} s of open_clip pretraining + {args.budget:.0f} s of "
        f"fine-tuning, mean of {len(seeds)} seed(s) (min..max)"
    )
    wise = [f"wise_{a:g}" for a in args.wise_ft]
    head = "".join(f" {name:>17}" for name in ("pretrained", "open_clip", "navit-clip", *wise))
    print(f"{'tokens/image':>13}{head} {'ratio':>6}")
    for k in ["native", *map(str, BUDGET_TOKENS)]:
        cells, means = [], {}
        for side in ("pretrained", "openclip", "navit", *wise):
            xs = [r[side][f"top1_{k}"] for r in runs]
            means[side] = statistics.fmean(xs)
            cells.append(f"{100 * means[side]:5.1f} ({100 * min(xs):4.1f}..{100 * max(xs):4.1f})")
            results[f"{side}_top1_{k}"] = round(means[side], 4)
        ratio = means["navit"] / max(means["openclip"], 1e-9)
        results[f"ratio_top1_navit_over_openclip_{k}"] = round(ratio, 3)
        for side in wise:
            results[f"ratio_top1_{side}_over_openclip_{k}"] = round(
                means[side] / max(means["openclip"], 1e-9), 3
            )
        print(f"{k:>13} " + " ".join(f"{c:>17}" for c in cells) + f" {ratio:6.2f}")
    own = [r["openclip"]["top1_96px"] for r in runs]
    pre = [r["pretrained_top1_96px"] for r in runs]
    steps = {side: statistics.fmean(r[side]["steps"] for r in runs) for side in ("openclip", "navit")}
    print(
        f"open_clip's own 96 x 96 centre-crop eval: pretrained {100 * statistics.fmean(pre):.1f}%, fine-tuned "
        f"{100 * statistics.fmean(own):.1f}%; steps (mean): open_clip {steps['openclip']:.0f}, navit-clip "
        f"{steps['navit']:.0f} ({time.perf_counter() - t_start:.0f} s in all)"
    )
    save_results("finetune_race_ablation" if args.only_navit else "finetune_race", results)


if __name__ == "__main__":
    main()
