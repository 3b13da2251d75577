"""Export a trained image encoder for VLMs: safetensors + config.json + preprocessor_config.json,
the torch-only module that loads them, the Hugging Face wrapper, and ONNX.

    navit-clip export runs/demo/step_00000300.pt exported/ [--with-text] [--no-onnx]
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import save_file

from navit_clip.factory import config_of, create_model
from navit_clip.model.clip import NORMALIZE
from navit_clip.model.vision import VisionConfig

HERE = Path(__file__).parent
# shipped files: (source in this package, name in the export folder)
MODULE_FILES = [
    (HERE / "exported" / "navit_encoder.py", "navit_encoder.py"),
    (HERE / "exported" / "modeling_navit.py", "modeling_navit.py"),
    (HERE / "model" / "layers.py", "navit_layers.py"),
    (HERE / "model" / "posemb.py", "navit_posemb.py"),
]
# the architecture fields of VisionConfig (attn_backend says how training attends, lock* what it trains)
VISION_KEYS = tuple(
    f.name for f in fields(VisionConfig) if f.name != "attn_backend" and not f.name.startswith("lock")
)


def load_exported_module(folder: str | Path):
    """Import OUT_DIR/navit_encoder.py as a plain module (what a user without navit_clip does)."""
    folder = str(Path(folder).resolve())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location("navit_encoder", Path(folder) / "navit_encoder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def export_encoder(
    checkpoint: str | Path,
    out_dir: str | Path,
    with_text: bool = False,
    onnx: bool = True,
    max_tokens: int = 256,
) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config_of(checkpoint)
    model = create_model(checkpoint)
    v = cfg.model.vision
    config = {k: getattr(v, k) for k in VISION_KEYS}
    config.update(
        embed_dim=cfg.model.embed_dim,
        image_proj=cfg.model.image_proj,
        model_type="navit_encoder",
        architectures=["NaViTModel"],
        auto_map={"AutoConfig": "modeling_navit.NaViTConfig", "AutoModel": "modeling_navit.NaViTModel"},
    )
    state = {k.removeprefix("visual."): t for k, t in model.state_dict().items() if k.startswith("visual.")}
    state.update({f"image_proj.{k}": t for k, t in model.image_proj.state_dict().items()})
    save_file({k: t.contiguous() for k, t in state.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    mean, std = NORMALIZE[cfg.model.normalize]  # the model's own preprocessing
    (out / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "patch_size": v.patch_size,
                "image_mean": list(mean),
                "image_std": list(std),
                "max_tokens": max_tokens,
                "merge": 1,
                "resample": "bilinear",
                "patch_layout": "row-major patches, each flattened as (row in patch, column in patch, channel)",
            },
            indent=1,
        )
    )
    for src, name in MODULE_FILES:
        shutil.copyfile(src, out / name)
    if with_text:
        prefixes = ("text.", "text_proj.", "logit_")
        text_state = {k: t for k, t in model.state_dict().items() if k.startswith(prefixes)}
        save_file({k: t.contiguous() for k, t in text_state.items()}, str(out / "text_model.safetensors"))
        text_cfg = {
            "text": asdict(cfg.model.text),
            "embed_dim": cfg.model.embed_dim,
            "text_proj": cfg.model.text_proj,
            "tokenizer": asdict(cfg.tokenizer),
        }
        (out / "text_config.json").write_text(json.dumps(text_cfg, indent=1))
    # The text tower's code ships with every export (the weights only with --with-text): transformers
    # checks every relative import of remote code, and navit_encoder.py imports .navit_text.
    shutil.copyfile(HERE / "model" / "text.py", out / "navit_text.py")
    if onnx:
        export_onnx(out)
    return out


class _TokensInterface(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, pixel_values, coords, token_grid, segment_ids, grid_hw):
        return self.encoder.forward_tokens(pixel_values, coords, token_grid, segment_ids, grid_hw)


def export_onnx(folder: str | Path) -> Path:
    """encoder.onnx: inputs pixel_values [T, C], coords [T, 2], token_grid [T, 2], segment_ids [T],
    grid_hw [n, 2] (token_layout(grid_hw) gives the middle three); outputs last_hidden_state [T, D],
    pooler_output [n, D], image_embeds [n, E]. T and n are dynamic."""
    folder = Path(folder)
    mod = load_exported_module(folder)
    encoder = mod.NaViTEncoder.from_pretrained(folder)
    P = encoder.navit_config["patch_size"]
    grid_hw = torch.tensor([[3, 5], [2, 2], [1, 4]])
    coords, token_grid, seg = mod.token_layout(grid_hw)
    pixels = torch.randn(len(seg), P * P * 3)
    T, N = torch.export.Dim("T", min=2), torch.export.Dim("n", min=1)
    path = folder / "encoder.onnx"
    torch.onnx.export(
        _TokensInterface(encoder).eval(),
        (pixels, coords, token_grid, seg, grid_hw),
        str(path),
        dynamo=True,
        input_names=["pixel_values", "coords", "token_grid", "segment_ids", "grid_hw"],
        output_names=["last_hidden_state", "pooler_output", "image_embeds"],
        dynamic_shapes=({0: T}, {0: T}, {0: T}, {0: T}, {0: N}),
        external_data=False,
    )
    return path
