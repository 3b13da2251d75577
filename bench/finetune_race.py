"""The fine-tune race: what converting an open_clip checkpoint to navit-clip buys, at equal wall-clock.

One run, on the shape task of the learning race (bench/learning_race.py: same data, same ViT-Ti-size
open_clip model, its own loop and loss):
  0. "pretrained": open_clip's CLIP trains at its fixed 96 x 96 for `--pretrain` seconds; its weights
     are written as an open_clip checkpoint (model-config .json + .safetensors), as a user owns one;
  (a) open_clip continues from that checkpoint for `--budget` seconds, as open_clip_train fine-tunes:
     square 96 x 96 images (resize + centre crop), batch 64;
  (b) `navit-clip convert-openclip` of the same checkpoint continues for the same `--budget` seconds
     with the NaViT recipe (model.init_from): native aspect ratios, longer side ~ U(48, 128) px, Beta
     token dropping (mean 0.25), 8 packed sequences of 256 tokens a step.
Both continue with the same optimiser settings (AdamW, lr `--lr`, betas (0.9, 0.98), eps 1e-6, weight
decay 0.1 on weight matrices, 20 warm-up steps, then a cosine over the budget).
All three models are evaluated zero-shot on the same held-out folder by the same code: at native size
(longer side up to 192 px) and at 16 ... 256 tokens per image, aspect kept. open_clip's models are
read there through their exact conversion, which is open_clip's model with its position table
resampled to each image's grid by timm's rule (tests/test_openclip.py): how an open_clip user runs a
checkpoint at another size. open_clip's own 96 x 96 centre-crop accuracy is printed beside it.

    python bench/finetune_race.py                       -> bench/results/finetune_race.json
    python bench/finetune_race.py --pretrain 120 --budget 60 --seed 1
"""

from __future__ import annotations

import argparse
import json
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
from navit_clip.tokenizer import tokenizer_for
from navit_clip.train import resolve_precision

ROOT = Path(__file__).resolve().parent.parent
WARMUP = 20
# navit-clip's recipe without its model: the architecture is the checkpoint's (model.init_from)
RECIPE = [o for o in NAVIT if not o.startswith(("model.", "tokenizer."))]


def zeroshot_of_openclip(oc_model, data: dict, device) -> dict:
    """An open_clip model's zero-shot at native size and every token budget, through its conversion."""
    navit, cfg = from_openclip(oc_model.cpu(), OPENCLIP_CONFIG, "open_clip ViT-Ti")
    oc_model.to(device)
    return navit_zeroshot(navit.to(device), tokenizer_for(cfg), cfg, data, device, BUDGET_TOKENS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrain", type=float, default=90.0, help="seconds of open_clip pretraining")
    ap.add_argument("--budget", type=float, default=90.0, help="seconds each side continues")
    ap.add_argument("--lr", type=float, default=2e-4, help="the fine-tuning peak learning rate, both sides")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data", help="where the shape task is generated (default bench/results/race_data)")
    args = ap.parse_args()
    device = torch.device(args.device)
    precision = resolve_precision("auto", device)
    oc_precision = "fp32" if device.type == "cpu" else precision  # open_clip's best on CPU (learning_race)
    data = race_data("shapes", args.data)
    work = ROOT / "bench" / "results" / "finetune_race"
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"pretrain_s": args.pretrain, "budget_s": args.budget, "lr": args.lr, "seed": args.seed}
    t_start = time.perf_counter()

    print(f"== 0. open_clip pretrains at 96 x 96 for {args.pretrain:.0f} s")
    torch.manual_seed(args.seed)
    oc = open_clip.CLIP(**OPENCLIP_CONFIG)
    pre = run_openclip(data, [args.pretrain], 0.0, device, args.seed, oc_precision, model=oc)
    results["pretrained_top1_96px"] = pre[f"at_{args.pretrain:.0f}s"]["top1_96px"]
    (work / "vit-ti.json").write_text(json.dumps(OPENCLIP_CONFIG))
    save_file(
        {k: t.detach().cpu().contiguous() for k, t in oc.state_dict().items()},
        str(work / "pretrained.safetensors"),
    )
    pretrained = {k: t.detach().clone() for k, t in oc.state_dict().items()}
    results["pretrained"] = zeroshot_of_openclip(oc, data, device)
    print(f"  pretrained checkpoint: {results['pretrained']}")

    print(f"== (a) open_clip continues at 96 x 96 for {args.budget:.0f} s")
    oc.load_state_dict(pretrained)
    a = run_openclip(data, [args.budget], 0.0, device, args.seed + 1, oc_precision, oc, args.lr, WARMUP)
    results["openclip"] = {**a[f"at_{args.budget:.0f}s"], **zeroshot_of_openclip(oc, data, device)}
    results["openclip_curve"] = a["curve"]

    print(f"== (b) navit-clip continues from the converted checkpoint for {args.budget:.0f} s")
    converted = convert_openclip(
        str(work / "vit-ti.json"), work / "pretrained.safetensors", work / "converted.pt"
    )
    overrides = RECIPE + [
        f"model.init_from={converted}",
        f"train.lr={args.lr}",
        f"train.warmup={WARMUP}",
        f"data.seed={args.seed + 1}",
    ]
    b = run_navit(data, [args.budget], overrides, device, seed=args.seed + 1, precision=precision)
    results["navit"] = b[f"at_{args.budget:.0f}s"]
    results["navit_curve"] = b["curve"]

    keys = ["native", *map(str, BUDGET_TOKENS)]
    print(
        f"\nzero-shot top-1 after {args.pretrain:.0f} s of pretraining + {args.budget:.0f} s of fine-tuning"
    )
    print(f"{'tokens/image':>13} {'pretrained':>11} {'open_clip':>10} {'navit-clip':>11} {'ratio':>6}")
    for k in keys:
        p, o, n = (results[side][f"top1_{k}"] for side in ("pretrained", "openclip", "navit"))
        results[f"ratio_top1_navit_over_openclip_{k}"] = round(n / max(o, 1e-9), 3)
        print(f"{k:>13} {100 * p:10.1f}% {100 * o:9.1f}% {100 * n:10.1f}% {n / max(o, 1e-9):6.2f}")
    print(
        f"open_clip's own 96 x 96 centre-crop eval: pretrained {100 * results['pretrained_top1_96px']:.1f}%, "
        f"fine-tuned {100 * results['openclip']['top1_96px']:.1f}%; steps: open_clip {results['openclip']['steps']}, "
        f"navit-clip {results['navit']['steps']} ({time.perf_counter() - t_start:.0f} s in all)"
    )
    save_results("finetune_race", results)


if __name__ == "__main__":
    main()
