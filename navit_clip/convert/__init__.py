"""Start from open_clip weights: an open_clip model becomes a packed NaViT-CLIP computing the same
embeddings.

    navit-clip convert-openclip ViT-B-32 --pretrained open_clip_model.safetensors converted.pt
    navit-clip convert-openclip ViT-B-16-SigLIP2 --pretrained open_clip_model.safetensors siglip2.pt \
        --tokenizer siglip2_tokenizer/          # optional; train and eval can name it later
    python train_clip.py --config configs/finetune_openclip.yaml model.init_from=converted.pt ...

One module per family, each reading only its own keys:
    openclip_vit   open_clip's own ViT image tower (CLIP, OpenAI, LAION ViTs)
    timm_vit       timm ViT / NaFlexViT image towers (SigLIP, SigLIP2 and its NaFlex models, timm CLIP ViTs)
    text           open_clip's own text transformers (CLIP's causal one, SigLIP's bidirectional one)
At the checkpoint's own square size a converted model's embeddings equal open_clip's; at any other
size they equal what the checkpoint's own code computes there (tests/test_openclip.py, test_siglip.py).
What does not convert (ConvNeXt, EVA, ResNets, CoCa, Hugging Face text towers, register tokens, layer
scale, ...) is one ValueError naming the field or layer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from navit_clip.config import Config, to_dict
from navit_clip.convert import openclip_vit, text, timm_vit
from navit_clip.convert.weights import read_weights
from navit_clip.model.clip import NORMALIZE, ModelConfig, NaViTCLIP

__all__ = ["convert_openclip", "from_openclip", "load_openclip", "navit_config", "read_weights"]


def openclip_config(model: str) -> dict:
    """open_clip's config of `model`: a name open_clip knows (ViT-B-32, ViT-B-16-SigLIP2, ...) or a JSON
    file in open_clip's model-config format (embed_dim, vision_cfg, text_cfg)."""
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


def _is_timm(oc_cfg: dict) -> bool:
    return bool(oc_cfg.get("vision_cfg", {}).get("timm_model_name"))


def navit_config(oc_cfg: dict, model: str = "the model", visual: torch.nn.Module | None = None) -> Config:
    """The navit-clip config (model, tokenizer, image normalisation) of an open_clip config, or a
    ValueError naming what does not convert. A timm tower is read from its module: `visual` (open_clip's
    TimmModel) when built, else one built on the meta device."""
    if "multimodal_cfg" in oc_cfg:
        raise ValueError(f"{model} is a CoCa model (multimodal_cfg): its decoder does not convert")
    v = oc_cfg.get("vision_cfg", {})
    if _is_timm(oc_cfg):
        visual = visual if visual is not None else timm_vit.build_trunk(oc_cfg, model)
        vision, image_proj, size = timm_vit.vision_config(visual, v.get("image_size", 224), model)
        pretrained_cfg = getattr(visual.trunk, "pretrained_cfg", None) or {}
        mean_std = pretrained_cfg.get("mean"), pretrained_cfg.get("std")
    else:
        vision, image_proj, size = openclip_vit.vision_config(oc_cfg, model)
        mean_std = None, None
    txt, text_proj, tokenizer = text.text_config(oc_cfg, model)
    cfg = Config()
    cfg.model = ModelConfig(
        vision=vision,
        text=txt,
        embed_dim=oc_cfg["embed_dim"],
        logit_bias="init_logit_bias" in oc_cfg,
        init_logit_bias=float(oc_cfg.get("init_logit_bias") or -10.0),
        image_proj=image_proj,
        text_proj=text_proj,
    )
    cfg.data.patch_size = vision.patch_size
    # what the checkpoint was trained on: `navit-clip eval` notes budgets past it (config.trained_side)
    cfg.data.resolution.max_side, cfg.data.resolution.min_side = size, min(cfg.data.resolution.min_side, size)
    cfg.model.normalize = cfg.data.normalize = _normalize_of(
        oc_cfg.get("preprocess_cfg", {}), model, *mean_std
    )
    cfg.tokenizer = tokenizer
    if cfg.model.logit_bias:
        cfg.loss.kind = "sigmoid"
    cfg.model.validate()
    return cfg


def _normalize_of(preprocess_cfg: dict, model: str, mean=None, std=None) -> str:
    """The model.normalize name of the model's pixel normalisation: its config's preprocess_cfg, else
    its timm tower's pretrained config, else CLIP's."""
    mean = tuple(preprocess_cfg.get("mean", mean or NORMALIZE["clip"][0]))
    std = tuple(preprocess_cfg.get("std", std or NORMALIZE["clip"][1]))
    for name, (m, s) in NORMALIZE.items():
        if all(abs(a - b) < 1e-6 for a, b in zip(mean + std, m + s)):
            return name
    raise ValueError(f"{model} normalises images with mean {mean}, std {std}; navit-clip knows {NORMALIZE}")


def converted_state(oc_model: torch.nn.Module, cfg: Config) -> dict[str, torch.Tensor]:
    """The navit-clip state dict of an open_clip CLIP / CustomTextCLIP whose config converts."""
    m = cfg.model
    if hasattr(oc_model.visual, "trunk"):
        out = timm_vit.vision_state(oc_model.visual, m.vision, m.image_proj)
    else:
        out = openclip_vit.vision_state(oc_model.visual, m.vision)
    # CLIP keeps its text tower's modules on itself; CustomTextCLIP under .text
    out.update(text.text_state(oc_model.text if hasattr(oc_model, "text") else oc_model, m.text_proj))
    out["logit_scale"] = oc_model.logit_scale.detach().reshape(1)
    if getattr(oc_model, "logit_bias", None) is not None:
        out["logit_bias"] = oc_model.logit_bias.detach().reshape(1)
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def from_openclip(
    oc_model: torch.nn.Module, oc_cfg: dict, model: str = "the model"
) -> tuple[NaViTCLIP, Config]:
    """A NaViTCLIP with the weights of an open_clip model built from `oc_cfg`, and its config."""
    cfg = navit_config(oc_cfg, model, oc_model.visual if _is_timm(oc_cfg) else None)
    navit = NaViTCLIP(cfg.model)
    state = converted_state(oc_model, cfg)
    expected = navit.state_dict()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:  # a field of oc_cfg that this converter does not map; a bug, not the user's
        raise ValueError(f"conversion of {model} left {missing[:3]} unset and {extra[:3]} unplaced")
    navit.load_state_dict(state)
    return navit.eval(), cfg


def load_openclip(model: str, pretrained: str | Path | None) -> tuple[torch.nn.Module, dict]:
    """open_clip's model of `model` (a name or a .json config) with the weights of the file
    `pretrained` (random weights without one), and its config. Nothing is downloaded."""
    import open_clip

    oc_cfg = openclip_config(model)
    navit_config(oc_cfg, model)  # what does not convert fails here, before building anything
    kwargs = {k: v for k, v in oc_cfg.items() if k not in ("custom_text", "preprocess_cfg")}
    kwargs["vision_cfg"] = _known_fields(oc_cfg.get("vision_cfg", {}), "vision_cfg", model)
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


# config fields of newer open_clip releases that say how to feed the model, not what it computes
INPUT_ONLY = {"image_seq_len"}  # open_clip main's NaFlex configs: the default tokens per image


def _known_fields(fields: dict, where: str, model: str) -> dict:
    """`fields` without what the installed open_clip's config class does not know but that changes no
    weight (INPUT_ONLY); any other unknown field is a ValueError naming it."""
    from dataclasses import fields as dataclass_fields

    from open_clip.model import CLIPVisionCfg

    known = {f.name for f in dataclass_fields(CLIPVisionCfg)}
    unknown = set(fields) - known
    if unknown - INPUT_ONLY:
        raise ValueError(
            f"{model} has {where} field(s) {sorted(unknown - INPUT_ONLY)} that the installed open_clip "
            "does not know (a config of a newer open_clip?)"
        )
    return {k: v for k, v in fields.items() if k in known}


def convert_openclip(
    model: str, pretrained: str | Path | None, out: str | Path, tokenizer: str | Path | None = None
) -> Path:
    """Write a navit-clip checkpoint (step 0, no optimiser state) of an open_clip model and weights:
    it evaluates, exports, and trains with model.init_from=OUT like any navit-clip checkpoint.
    `tokenizer`: the model's tokenizer file or folder, where it is not open_clip's BPE (optional)."""
    from navit_clip.checkpoint import atomic_save
    from navit_clip.tokenizer import tokenizer_for

    oc_cfg = openclip_config(model)
    if tokenizer:  # checked before the (slow) model build
        text.with_tokenizer_file(navit_config(oc_cfg, model).tokenizer, tokenizer)
    oc_model, oc_cfg = load_openclip(model, pretrained)
    navit, cfg = from_openclip(oc_model, oc_cfg, model)
    if tokenizer:
        cfg.tokenizer = text.with_tokenizer_file(cfg.tokenizer, tokenizer)
        tokenizer_for(cfg, fixed_vocab=True)  # it fits the embedding table; its pad id is recorded
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    source = {"openclip_model": model, "pretrained": str(pretrained or "")}
    atomic_save({"model": navit.state_dict(), "config": to_dict(cfg), "step": 0, "source": source}, out)
    return out


def family(model: str, oc_cfg: dict) -> str:
    """The docs' family of an open_clip config: SigLIP2, SigLIP, timm tower or open_clip ViT."""
    if "SigLIP2" in model:
        return "SigLIP2"
    if "SigLIP" in model and "nllb" not in model:
        return "SigLIP"
    return "other timm towers" if _is_timm(oc_cfg) else "open_clip's own towers"


def conversion_table() -> dict[str, tuple[list[str], list[str]]]:
    """Every open_clip config by family: (those that convert, those refused): docs/converting.md's table."""
    import open_clip

    table: dict[str, tuple[list[str], list[str]]] = {}
    for model in open_clip.list_models():
        oc_cfg = open_clip.get_model_config(model)
        try:
            navit_config(oc_cfg, model)
            converts = True
        except ValueError:
            converts = False
        table.setdefault(family(model, oc_cfg), ([], []))[0 if converts else 1].append(model)
    return table
