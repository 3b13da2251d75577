"""Zero-shot top-1 of an open_clip main NaFlex model, with its own eval path, at several token budgets.

    PYTHONPATH=<open_clip checkout>/src python bench/naflex_eval.py --config CFG.json --weights W.pt \
        --eval EVAL.json --tokens 16,36,64,144,256 --out RESULT.json

Runs under open_clip main (a NaFlex-capable checkout), never the installed release: the model is built
as `open_clip_train.main --use-naflex` builds it (`force_naflex_vision`, timm's NaFlex transforms), each
budget's images go through timm's NaFlex eval transform (`max_seq_len` = the budget, aspect kept) and
open_clip's NaFlex collator, the classifier is open_clip's `build_zero_shot_classifier`. EVAL.json holds
the class names, the templates ("a photo of a {}.") and the held-out images as [path, label] pairs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import open_clip
import siglip_shape  # noqa: F401  (registers the SigLIP-shaped race tower with timm)
import torch
from open_clip_train.naflex_data import collate_naflex_tuples
from PIL import Image


@torch.no_grad()
def top1(model, classifier, transform, max_seq_len: int, images: list, batch: int = 128) -> float:
    correct = 0
    for i in range(0, len(images), batch):
        chunk = images[i : i + batch]
        samples = [(transform(Image.open(path).convert("RGB")), label) for path, label in chunk]
        inputs, labels = collate_naflex_tuples(samples, max_seq_len=max_seq_len)
        features = model(image=inputs)["image_features"]
        correct += int(((features @ classifier).argmax(1) == torch.as_tensor(labels)).sum())
    return correct / len(images)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--tokens", default="36")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    open_clip.add_model_config(args.config)
    name = Path(args.config).stem
    model, _, factory = open_clip.create_model_and_transforms(
        name, force_naflex_vision=True, aug_cfg={"use_timm": True, "naflex": True}, output_dict=True
    )
    model.load_state_dict(torch.load(args.weights, weights_only=True)["state_dict"])
    model.eval()
    spec = json.loads(Path(args.eval).read_text())
    templates = [t.format for t in spec["templates"]]
    classifier = open_clip.build_zero_shot_classifier(
        model, open_clip.get_tokenizer(name), spec["classnames"], templates, device="cpu"
    )
    patch = model.visual.trunk.embeds.patch_size
    result = {}
    for t in (int(x) for x in args.tokens.split(",")):
        result[f"top1_{t}"] = round(
            top1(model, classifier, factory(max_seq_len=t, patch_size=patch), t, spec["images"]), 4
        )
    print(result)
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
