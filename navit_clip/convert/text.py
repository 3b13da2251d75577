"""open_clip's own text transformers (open_clip.transformer.TextTransformer) -> navit-clip's text tower,
and the tokenizer settings that reproduce open_clip's ids: CLIP's (causal, pooled at the end-of-text
token, open_clip's BPE) and SigLIP's (bidirectional over the whole padded context, pooled at its last
position, a projection with a bias, LayerNorm eps 1e-6, tanh GELU for SigLIP2, a SentencePiece /
Hugging Face tokenizer with big_vision's text cleaning). Reads the text keys only."""

from __future__ import annotations

from pathlib import Path

import torch

from navit_clip.config import TokenizerConfig
from navit_clip.convert.openclip_vit import PLAIN_BLOCK, refuse_fields, resblocks_state
from navit_clip.model.text import TextConfig

TEXT_PLAIN = {"hf_model_name": None, "embed_cls": False, "use_pad_mask": False, **PLAIN_BLOCK}
POOLS = {"argmax": "eot", "last": "last", "first": "first"}  # open_clip's pool_type -> ours


def activation(quick_gelu: bool, act_kwargs: dict | None, where: str, model: str) -> str:
    if quick_gelu and act_kwargs:
        raise ValueError(f"{model} has quick_gelu with {where}.act_kwargs={act_kwargs}; one of them converts")
    if quick_gelu:
        return "quick_gelu"
    approximate = (act_kwargs or {}).get("approximate", "none")
    if set(act_kwargs or {}) - {"approximate"} or approximate not in ("none", "tanh"):
        raise ValueError(f"{model} has {where}.act_kwargs={act_kwargs}; GELU, exact or tanh, converts")
    return "gelu_tanh" if approximate == "tanh" else "gelu"


def text_config(oc_cfg: dict, model: str) -> tuple[TextConfig, str, TokenizerConfig]:
    """The TextConfig of an open_clip config's text tower, its projection kind and its tokenizer."""
    t = dict(oc_cfg.get("text_cfg", {}))
    if "hf_model_name" in t and t["hf_model_name"]:
        raise ValueError(
            f"{model}'s text tower is the Hugging Face model {t['hf_model_name']} (text_cfg.hf_model_name): "
            "only open_clip's own text transformer converts"
        )
    refuse_fields(t, TEXT_PLAIN, "text_cfg", model, "open_clip's own text transformer")
    pool = POOLS.get(t.get("pool_type", "argmax"))
    if pool is None:
        raise ValueError(f"{model} has text_cfg.pool_type={t['pool_type']!r}; argmax, last or first converts")
    hf_name = t.get("hf_tokenizer_name")
    if pool == "eot" and hf_name:  # argmax finds the end of text only in open_clip's BPE ids
        raise ValueError(
            f"{model} pools text at argmax over ids of {hf_name}; argmax converts with open_clip's BPE"
        )
    causal = not t.get("no_causal_mask", False)
    if pool in ("last", "first") and causal:
        raise ValueError(
            f"{model} pools text at its {pool} position under a causal mask; it does not convert"
        )
    proj_type = t.get("proj_type", "linear")
    if proj_type not in ("linear", "none"):
        raise ValueError(f"{model} has text_cfg.proj_type={proj_type!r}; linear or none converts")
    proj = "none" if proj_type == "none" else ("linear_bias" if t.get("proj_bias", False) else "linear")
    text = TextConfig(
        vocab_size=t.get("vocab_size", 49408),
        pad_id=t.get("pad_id", 0),
        context_length=t.get("context_length", 77),
        width=t.get("width", 512),
        depth=t.get("layers", 12),
        heads=t.get("heads", 8),
        mlp_ratio=t.get("mlp_ratio", 4.0),
        pool=pool,
        ln_eps=(t.get("norm_kwargs") or {}).get("eps", 1e-5),
        act=activation(oc_cfg.get("quick_gelu", False), t.get("act_kwargs"), "text_cfg", model),
        causal=causal,
    )
    return text, proj, tokenizer_config(t, model)


def tokenizer_config(t: dict, model: str) -> TokenizerConfig:
    """open_clip's BPE, or the settings that make a local copy of the model's Hugging Face tokenizer
    give open_clip's HFTokenizer ids (its own call, open_clip's cleaning)."""
    K = t.get("context_length", 77)
    hf_name = t.get("hf_tokenizer_name")
    if not hf_name:
        return TokenizerConfig(kind="openclip", context_length=K)
    kwargs = dict(t.get("tokenizer_kwargs") or {})
    clean = kwargs.pop("clean", "whitespace")  # open_clip's HFTokenizer default
    if kwargs:
        raise ValueError(f"{model} has text_cfg.tokenizer_kwargs {kwargs}; only 'clean' converts")
    return TokenizerConfig(kind="hf", layout="hf", clean=clean, context_length=K, source=hf_name)


def with_tokenizer_file(tok: TokenizerConfig, path: str | Path) -> TokenizerConfig:
    """The tokenizer settings with the local file a user has: a Hugging Face folder / tokenizer.json,
    or a SentencePiece .model (then padded with its end-of-text id, big_vision's SigLIP layout)."""
    if tok.kind == "openclip":
        raise ValueError(
            f"--tokenizer {path}: this model tokenizes with open_clip's BPE, shipped with open_clip"
        )
    if not Path(path).exists():
        raise ValueError(f"--tokenizer {path} does not exist")
    tok.path = str(path)
    if str(path).endswith(".model"):
        tok.kind, tok.layout, tok.pad_with_eos = "sentencepiece", "navit", True
    return tok


def text_state(txt: torch.nn.Module, proj: str) -> dict[str, torch.Tensor]:
    """navit-clip's `text.*` and `text_proj.*` tensors of open_clip's text tower `txt` (CLIP keeps its
    text modules on itself, CustomTextCLIP under .text: pass either)."""
    out = {
        "text.token_embed.weight": txt.token_embedding.weight,
        "text.pos_embed": txt.positional_embedding,
        "text.norm.weight": txt.ln_final.weight,
        "text.norm.bias": txt.ln_final.bias,
    }
    p = txt.text_projection
    if proj == "linear":
        out["text_proj.weight"] = p.detach().t() if isinstance(p, torch.nn.Parameter) else p.weight
    elif proj == "linear_bias":
        out["text_proj.weight"], out["text_proj.bias"] = p.weight, p.bias
    out.update(resblocks_state(txt.transformer.resblocks, "text.blocks", ""))
    return out
