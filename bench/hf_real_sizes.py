"""transformers checkpoints at the sizes VLMs use, by hand: random weights from each real model's config
(nothing is downloaded) -> `navit-clip convert` -> `export --format hf` -> transformers' own class again.

Prints the largest absolute and the relative difference of the image embeddings at each end and writes
bench/results/hf_real_sizes.json. The tests do the same at a small size; this checks that nothing breaks
at full width and depth (and off-grid image sizes such as 384 / 14).

    python bench/hf_real_sizes.py [--only siglip_b16_384 clip_l14_336 siglip_so400m_14_384]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

# name: (family, config fields, image size); the configs are the hub models' vision configs
CASES = {
    "siglip_b16_384": (  # google/siglip-base-patch16-384
        "siglip",
        dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            patch_size=16,
        ),
        384,
    ),
    "clip_l14_336": (  # openai/clip-vit-large-patch14-336 (LLaVA's tower)
        "clip",
        dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            patch_size=14,
            projection_dim=768,
            hidden_act="quick_gelu",
        ),
        336,
    ),
    "siglip_so400m_14_384": (  # google/siglip-so400m-patch14-384 (LLaVA-OneVision, PaliGemma)
        "siglip",
        dict(
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=27,
            num_attention_heads=16,
            patch_size=14,
        ),
        384,
    ),
}


def _embeds(model, family: str, pixels: torch.Tensor) -> torch.Tensor:
    out = model(pixel_values=pixels)
    return out.image_embeds if family == "clip" else out.pooler_output


def check(name: str, root: Path) -> dict:
    import transformers as tf
    from hf_utils import real_images

    from navit_clip.checkpoint import atomic_save
    from navit_clip.config import to_dict
    from navit_clip.convert.hf import export_hf, from_hf

    family, fields, size = CASES[name]
    torch.manual_seed(0)
    t0 = time.time()
    if family == "clip":
        hf = tf.CLIPVisionModelWithProjection(tf.CLIPVisionConfig(**fields, image_size=size)).eval()
        proc = tf.CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    else:
        cfg = tf.SiglipVisionConfig(
            **fields, image_size=size, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6
        )
        hf = tf.SiglipVisionModel(cfg).eval()
        proc = tf.SiglipImageProcessor(size={"height": size, "width": size})
    hf.save_pretrained(root / "hf")
    navit, ncfg, hf = from_hf(root / "hf")
    x = proc(images=real_images(2), return_tensors="pt").pixel_values
    side = ncfg.model.vision.max_grid * fields["patch_size"]  # transformers' conv reads only whole patches
    x = x[..., :side, :side]
    with torch.no_grad():
        want = _embeds(hf, family, x)
        got = navit.encode_image(list(x))
    atomic_save({"model": navit.state_dict(), "config": to_dict(ncfg), "step": 0}, root / "c.pt")
    export_hf(root / "c.pt", root / "export")
    back = type(hf).from_pretrained(root / "export").eval()
    with torch.no_grad():
        again = _embeds(back, family, x)
    row = {
        "name": name,
        "class": type(hf).__name__,
        "params_M": round(sum(p.numel() for p in hf.parameters()) / 1e6, 1),
        "convert_max_abs": (got - want).abs().max().item(),
        "convert_rel": ((got - want).norm() / want.norm()).item(),
        "export_max_abs": (again - got).abs().max().item(),
        "seconds": round(time.time() - t0, 1),
    }
    print(
        f"{name} ({row['class']}, {row['params_M']} M): convert max abs {row['convert_max_abs']:.2e} "
        f"rel {row['convert_rel']:.2e}; export max abs {row['export_max_abs']:.2e} ({row['seconds']} s)",
        flush=True,
    )
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=sorted(CASES), default=list(CASES))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "hf_real_sizes.json"))
    args = ap.parse_args(argv)
    rows = []
    for name in args.only:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(check(name, Path(tmp)))
    Path(args.out).write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    return 0 if all(max(r["convert_max_abs"], r["export_max_abs"]) < 1e-4 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
