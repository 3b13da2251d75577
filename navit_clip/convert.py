"""Start from open_clip weights: an open_clip ViT becomes a packed NaViT computing the same function.

    navit-clip convert-openclip ViT-B-32 --pretrained open_clip_model.safetensors converted.pt
    python train_clip.py --config configs/finetune_openclip.yaml model.init_from=converted.pt ...

The image tower converts into the NaViT options that are CLIP's ViT: a class token per image
(`cls_token`, pooled as `pool=cls`), one learned 2D position table of the checkpoint's grid, resampled
to each image's own rows x columns (`posemb=learned2d`; read unchanged at the trained grid), `ln_pre`,
biases, no qk-norm, the final LayerNorm and the projection, QuickGELU for OpenAI's weights. The text
tower is the same transformer as open_clip's. At open_clip's own square size the converted model's
embeddings equal open_clip's (tests/test_openclip.py); at any other size they equal open_clip's model
with its position table resampled by timm's `resample_abs_pos_embed`.

What is not a ViT open_clip builds itself (timm or Hugging Face towers: ConvNeXt, EVA, SigLIP's timm
ViTs, RN50, XLM-R text), or uses a block variant NaViT does not have (layer scale, CoCa's attentional
pooler, scaled-cosine attention, a text class token), is a ValueError naming the field.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from navit_clip.config import Config, to_dict
from navit_clip.data.pipeline import NORMALIZE
from navit_clip.model.clip import ModelConfig, NaViTCLIP
from navit_clip.model.text import TextConfig
from navit_clip.model.vision import VisionConfig

# open_clip config fields (vision_cfg / text_cfg) that change the architecture away from what converts,
# with the value that converts
PLAIN_BLOCK = {  # open_clip's CustomResidualAttentionBlock options, in either tower
    "ls_init_value": None,
    "block_type": None,
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
}
VISION_PLAIN = {"timm_model_name": None, "attentional_pool": False, **PLAIN_BLOCK}
TEXT_PLAIN = {
    "hf_model_name": None,
    "hf_tokenizer_name": None,
    "embed_cls": False,
    "no_causal_mask": False,
    "pool_type": "argmax",
    "proj_type": "linear",
    "proj_bias": False,
    **PLAIN_BLOCK,
}


def openclip_config(model: str) -> dict:
    """open_clip's config of `model`: a name open_clip knows (ViT-B-32, ViT-L-14-quickgelu, ...) or
    a JSON file in open_clip's model-config format (embed_dim, vision_cfg, text_cfg)."""
    import json

    import open_clip

    if model.endswith(".json"):
        if not Path(model).is_file():
            raise ValueError(f"model config {model} does not exist")
        return json.loads(Path(model).read_text())
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        vits = [m for m in open_clip.list_models() if m.startswith("ViT-")]
        raise ValueError(
            f"open_clip knows no model {model!r}; its ViTs: {', '.join(vits[:12])}, ... "
            "(open_clip.list_models()), or give a model-config .json file"
        )
    return cfg


def navit_config(oc_cfg: dict, model: str = "the model") -> Config:
    """The navit-clip config (model, tokenizer, image normalisation) of an open_clip config, or a
    ValueError naming what does not convert."""
    v, t = dict(oc_cfg.get("vision_cfg", {})), dict(oc_cfg.get("text_cfg", {}))
    if "multimodal_cfg" in oc_cfg:
        raise ValueError(f"{model} is a CoCa model (multimodal_cfg): its decoder does not convert")
    if isinstance(v.get("layers", 12), (list, tuple)):
        raise ValueError(f"{model}'s image tower is a ResNet (vision_cfg.layers={v['layers']}), not a ViT")
    for where, fields, plain in (("vision_cfg", v, VISION_PLAIN), ("text_cfg", t, TEXT_PLAIN)):
        for key, ok in plain.items():
            if fields.get(key, ok) not in (ok, "default"):
                raise ValueError(
                    f"{model} has {where}.{key}={fields[key]!r}: only open_clip's own plain ViT / text "
                    f"transformer converts ({where}.{key}={ok!r})"
                )
    size = v.get("image_size", 224)
    if isinstance(size, (list, tuple)) and size[0] != size[1]:
        raise ValueError(f"{model} has a non-square vision_cfg.image_size={size}; a square one converts")
    size = size[0] if isinstance(size, (list, tuple)) else size
    P = v.get("patch_size", 16)
    pool = {"tok": "cls", "avg": "mean"}.get(v.get("pool_type", "tok"))
    if pool is None or (pool == "mean" and v.get("final_ln_after_pool", False)):
        raise ValueError(
            f"{model} has vision_cfg.pool_type={v.get('pool_type')!r} "
            f"(final_ln_after_pool={v.get('final_ln_after_pool', False)}); 'tok', or 'avg' with the norm "
            "before pooling, converts"
        )
    act = "quick_gelu" if oc_cfg.get("quick_gelu", False) else "gelu"
    for where, fields in (("vision_cfg", v), ("text_cfg", t)):
        if fields.get("act_kwargs"):
            raise ValueError(f"{model} has {where}.act_kwargs={fields['act_kwargs']}; plain GELU converts")
    width = v.get("width", 768)
    vision = VisionConfig(
        patch_size=P,
        width=width,
        depth=v.get("layers", 12),
        heads=width // v.get("head_width", 64),
        mlp_ratio=v.get("mlp_ratio", 4.0),
        qk_norm=False,
        bias=True,
        posemb="learned2d",
        max_grid=size // P,
        pool=pool,
        ln_eps=(v.get("norm_kwargs") or {}).get("eps", 1e-5),
        ln_pre=not v.get("no_ln_pre", False),
        cls_token=True,
        act=act,
    )
    text = TextConfig(
        vocab_size=t.get("vocab_size", 49408),
        pad_id=t.get("pad_id", 0),
        context_length=t.get("context_length", 77),
        width=t.get("width", 512),
        depth=t.get("layers", 12),
        heads=t.get("heads", 8),
        mlp_ratio=t.get("mlp_ratio", 4.0),
        pool="eot",  # argmax of open_clip's BPE ids = its end-of-text token = the last non-padding one
        ln_eps=(t.get("norm_kwargs") or {}).get("eps", 1e-5),
        act=act,
    )
    cfg = Config()
    cfg.model = ModelConfig(
        vision=vision,
        text=text,
        embed_dim=oc_cfg["embed_dim"],
        logit_bias="init_logit_bias" in oc_cfg,
        init_logit_bias=float(oc_cfg.get("init_logit_bias") or -10.0),
    )
    cfg.data.patch_size = P
    # what the checkpoint was trained on: `navit-clip eval` notes budgets past it (config.trained_side)
    cfg.data.resolution.max_side, cfg.data.resolution.min_side = size, min(cfg.data.resolution.min_side, size)
    cfg.data.normalize = _normalize_of(oc_cfg.get("preprocess_cfg", {}), model)
    cfg.tokenizer.kind = "openclip"
    cfg.tokenizer.context_length = text.context_length
    if cfg.model.logit_bias:
        cfg.loss.kind = "sigmoid"
    cfg.model.validate()
    return cfg


def _normalize_of(preprocess_cfg: dict, model: str) -> str:
    mean = tuple(preprocess_cfg.get("mean", NORMALIZE["clip"][0]))
    std = tuple(preprocess_cfg.get("std", NORMALIZE["clip"][1]))
    for name, (m, s) in NORMALIZE.items():
        if all(abs(a - b) < 1e-6 for a, b in zip(mean + std, m + s)):
            return name
    raise ValueError(f"{model} normalises images with mean {mean}, std {std}; navit-clip knows {NORMALIZE}")


def converted_state(oc_model: torch.nn.Module, cfg: Config) -> dict[str, torch.Tensor]:
    """The navit-clip state dict of an open_clip CLIP / CustomTextCLIP with a plain ViT and text tower."""
    vis = oc_model.visual
    # CLIP keeps its text tower's modules on itself; CustomTextCLIP under .text
    txt = oc_model.text if hasattr(oc_model, "text") else oc_model
    G, W = cfg.model.vision.max_grid, cfg.model.vision.width
    pos = vis.positional_embedding.detach()
    if pos.shape[0] != G * G + 1:
        raise ValueError(
            f"visual.positional_embedding has {pos.shape[0]} rows; a {G} x {G} grid needs {G * G + 1}"
        )
    out = {
        "visual.patch_embed.weight": vis.conv1.weight.detach().permute(0, 2, 3, 1).reshape(W, -1),
        # the class token's position vector is folded into it: it only ever sits at position 0
        "visual.cls_token": vis.class_embedding.detach() + pos[0],
        "visual.posemb.table": pos[1:].reshape(G, G, W),
        "visual.norm.weight": vis.ln_post.weight.detach(),
        "visual.norm.bias": vis.ln_post.bias.detach(),
        "image_proj.weight": vis.proj.detach().t(),
        "text.token_embed.weight": txt.token_embedding.weight.detach(),
        "text.pos_embed": txt.positional_embedding.detach(),
        "text.norm.weight": txt.ln_final.weight.detach(),
        "text.norm.bias": txt.ln_final.bias.detach(),
        "text_proj.weight": txt.text_projection.detach().t(),
        "logit_scale": oc_model.logit_scale.detach().reshape(1),
    }
    if cfg.model.vision.ln_pre:
        out["visual.ln_pre.weight"], out["visual.ln_pre.bias"] = (
            vis.ln_pre.weight.detach(),
            vis.ln_pre.bias.detach(),
        )
    if getattr(oc_model, "logit_bias", None) is not None:
        out["logit_bias"] = oc_model.logit_bias.detach().reshape(1)
    for prefix, blocks in (
        ("visual.blocks", vis.transformer.resblocks),
        ("text.blocks", txt.transformer.resblocks),
    ):
        attn = "attn" if prefix.startswith("visual") else ""  # text blocks hold qkv / proj themselves
        for i, b in enumerate(blocks):
            p = f"{prefix}.{i}."
            a = f"{p}{attn}." if attn else p
            out.update(
                {
                    f"{p}norm1.weight": b.ln_1.weight,
                    f"{p}norm1.bias": b.ln_1.bias,
                    f"{a}qkv.weight": b.attn.in_proj_weight,
                    f"{a}qkv.bias": b.attn.in_proj_bias,
                    f"{a}proj.weight": b.attn.out_proj.weight,
                    f"{a}proj.bias": b.attn.out_proj.bias,
                    f"{p}norm2.weight": b.ln_2.weight,
                    f"{p}norm2.bias": b.ln_2.bias,
                    f"{p}mlp.fc1.weight": b.mlp.c_fc.weight,
                    f"{p}mlp.fc1.bias": b.mlp.c_fc.bias,
                    f"{p}mlp.fc2.weight": b.mlp.c_proj.weight,
                    f"{p}mlp.fc2.bias": b.mlp.c_proj.bias,
                }
            )
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def from_openclip(
    oc_model: torch.nn.Module, oc_cfg: dict, model: str = "the model"
) -> tuple[NaViTCLIP, Config]:
    """A NaViTCLIP with the weights of an open_clip model built from `oc_cfg`, and its config."""
    cfg = navit_config(oc_cfg, model)
    navit = NaViTCLIP(cfg.model)
    state = converted_state(oc_model, cfg)
    expected = navit.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:  # a field of oc_cfg that this converter does not map; a bug, not the user's
        raise ValueError(f"conversion of {model} left {len(missing)} tensor(s) unset: {missing[:3]}")
    navit.load_state_dict(state)
    return navit.eval(), cfg


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """An open_clip checkpoint file's state dict: .safetensors, or a torch file (.bin / .pt: a state
    dict, open_clip_train's {"state_dict": ...} with DDP's "module." prefix, or OpenAI's TorchScript
    archive)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--pretrained {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            if not _is_torchscript(path):
                raise ValueError(
                    f"--pretrained {path} is not a readable checkpoint ({type(e).__name__})"
                ) from None
            with warnings.catch_warnings():  # OpenAI's original .pt files are TorchScript archives
                warnings.simplefilter("ignore", FutureWarning)
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ValueError(f"--pretrained {path} holds no state dict of tensors")
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): t for k, t in state.items()}
    for key in ("input_resolution", "context_length", "vocab_size"):  # OpenAI archives' extras
        state.pop(key, None)
    return state


def _is_torchscript(path: Path) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.endswith("constants.pkl") for name in z.namelist())


def load_openclip(model: str, pretrained: str | Path | None) -> tuple[torch.nn.Module, dict]:
    """open_clip's model of `model` (a name or a .json config) with the weights of the file
    `pretrained` (random weights without one), and its config. Nothing is downloaded."""
    import open_clip

    oc_cfg = openclip_config(model)
    navit_config(oc_cfg, model)  # what does not convert fails here, before building anything
    kwargs = {k: v for k, v in oc_cfg.items() if k not in ("custom_text", "preprocess_cfg")}
    cls = open_clip.CustomTextCLIP if oc_cfg.get("custom_text", False) else open_clip.CLIP
    oc_model = cls(**kwargs)
    if pretrained:
        state, expected = read_weights(pretrained), oc_model.state_dict()
        expected = {k: t for k, t in expected.items() if k != "attn_mask"}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected) - {"attn_mask"})
        if missing or unexpected:
            raise ValueError(
                f"--pretrained {pretrained} is not a {model} checkpoint: {len(missing)} missing key(s) "
                f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}"
            )
        for k, t in expected.items():
            if state[k].shape != t.shape:
                raise ValueError(
                    f"--pretrained {pretrained}: {k} has shape {tuple(state[k].shape)}, {model}'s is "
                    f"{tuple(t.shape)} (another model size, image size or context length?)"
                )
        oc_model.load_state_dict(state, strict=False)
    return oc_model.eval(), oc_cfg


def convert_openclip(model: str, pretrained: str | Path | None, out: str | Path) -> Path:
    """Write a navit-clip checkpoint (step 0, no optimiser state) of an open_clip model and weights:
    it evaluates, exports, and trains with model.init_from=OUT like any navit-clip checkpoint."""
    from navit_clip.checkpoint import atomic_save

    oc_model, oc_cfg = load_openclip(model, pretrained)
    navit, cfg = from_openclip(oc_model, oc_cfg, model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    source = {"openclip_model": model, "pretrained": str(pretrained or "")}
    atomic_save({"model": navit.state_dict(), "config": to_dict(cfg), "step": 0, "source": source}, out)
    return out
