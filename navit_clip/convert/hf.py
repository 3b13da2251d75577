"""transformers' CLIP, SigLIP and SigLIP2 (NaFlex) <-> navit-clip, both ways, exactly.

    navit-clip convert HF_FOLDER converted.pt            # config.json + model.safetensors / .bin / shards
    navit-clip export CKPT OUT --format hf [--with-text] # CLIPVisionModelWithProjection, SiglipVisionModel,
                                                         # Siglip2VisionModel (or the whole two-tower model)

Both directions go through transformers' own classes: a folder is read by `from_pretrained` (every weight
format, sharding and key renaming of the installed transformers), and an export is a transformers model
built from its config, its tensors set from navit-clip's, written by `save_pretrained`. One table of links
(`vision_links`, `text_links`) says which navit-clip tensor is which transformers tensor; reading and
writing both walk it, so the two directions cannot disagree.

What maps onto what (the NaViT options, in model/vision.py):
    CLIP      class token (pool=cls, its position vector folded in), learned2d table (bicubic), ln_pre,
              biases, post-LayerNorm, a linear projection; causal text pooled at its end-of-text token
    SigLIP    no class token, a learned2d table (bicubic) at the checkpoint's grid, patch bias, MAP head,
              no projection; bidirectional text pooled at its last position, a projection with a bias
    SigLIP2   NaFlex: SigLIP's, the table resampled to each image's grid by antialiased bilinear
              interpolation (posemb_interp=bilinear), patches projected by a Linear
The class is chosen from the tower's structure, never from a name; a tower or field with no counterpart is
one ValueError naming it.

Shape legend: W width, G table side (patches), P patch size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from navit_clip.config import Config, TokenizerConfig
from navit_clip.model.clip import NORMALIZE, ModelConfig
from navit_clip.model.text import TextConfig
from navit_clip.model.vision import VisionConfig

# model_type in a transformers config.json -> (family, whole two-tower model or vision tower only)
MODEL_TYPES = {
    "clip": ("clip", True),
    "siglip": ("siglip", True),
    "siglip2": ("siglip2", True),
    "clip_vision_model": ("clip", False),
    "siglip_vision_model": ("siglip", False),
    "siglip2_vision_model": ("siglip2", False),
}
# navit-clip's activation names <-> transformers' hidden_act (each the same function exactly)
ACTS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}
HF_ACTS = {v: k for k, v in ACTS.items()}
# the files a tokenizer folder is made of: any of them makes the folder's tokenizer the model's
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "vocab.json", "tokenizer.model", "tokenizer_config.json")


# ----------------------------------------------------------------------------------------------------
# the links: which navit-clip tensor is which transformers tensor


@dataclass
class Link:
    """navit-clip's tensor `key` is the rows `rows` of each transformers tensor in `parts`, concatenated
    along dim 0 (q, k and v into one qkv; one in_proj into q and kv), then `to_navit` applied (a conv
    kernel flattened, a table reshaped); `to_hf` undoes it."""

    key: str
    parts: list[tuple[torch.Tensor, slice]]
    shape: str = ""  # "" as is | conv [W, 3, P, P] <-> [W, P*P*3] | table [G*G, W] <-> [G, G, W] | vector

    def read(self) -> torch.Tensor:
        t = torch.cat([_rows(p, rows) for p, rows in self.parts])
        if self.shape == "conv":
            return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)
        if self.shape == "table":
            G = round(t.shape[0] ** 0.5)
            return t.reshape(G, G, -1)
        return t.reshape(-1) if self.shape == "vector" else t

    def write(self, value: torch.Tensor) -> None:
        views = [_rows(p, rows) for p, rows in self.parts]
        if self.shape == "conv":
            W, _, P, _ = views[0].shape
            value = value.reshape(W, P, P, -1).permute(0, 3, 1, 2)
        value = value.reshape(-1, *views[0].shape[1:])
        with torch.no_grad():
            for view, v in zip(views, value.split([t.shape[0] for t in views])):
                view.copy_(v)


def _rows(p: torch.Tensor, rows: slice) -> torch.Tensor:
    """A view of rows of `p` (a 0-d tensor, CLIP's logit_scale, as one row), without autograd."""
    p = p.detach()
    return (p if p.dim() else p.view(1))[rows]


ALL = slice(None)


def _linear(key: str, *layers: nn.Module) -> list[Link]:
    """A navit-clip Linear that is one transformers Linear, or several stacked (q, k, v)."""
    out = [Link(f"{key}.weight", [(layer.weight, ALL) for layer in layers])]
    if layers[0].bias is not None:
        out.append(Link(f"{key}.bias", [(layer.bias, ALL) for layer in layers]))
    return out


def _norm(key: str, layer: nn.LayerNorm) -> list[Link]:
    return [Link(f"{key}.weight", [(layer.weight, ALL)]), Link(f"{key}.bias", [(layer.bias, ALL)])]


def _encoder_links(prefix: str, layers, attn: str) -> list[Link]:
    """transformers' encoder layers (layer_norm1, self_attn q/k/v/out_proj, layer_norm2, mlp) as
    navit-clip blocks; `attn` is where a block keeps qkv / proj ("attn." in the image tower, "")."""
    out = []
    for i, layer in enumerate(layers):
        p, a = f"{prefix}.{i}.", layer.self_attn
        out += _norm(p + "norm1", layer.layer_norm1) + _norm(p + "norm2", layer.layer_norm2)
        out += _linear(p + attn + "qkv", a.q_proj, a.k_proj, a.v_proj) + _linear(
            p + attn + "proj", a.out_proj
        )
        out += _linear(p + "mlp.fc1", layer.mlp.fc1) + _linear(p + "mlp.fc2", layer.mlp.fc2)
    return out


def _core(module: nn.Module, inner: str) -> nn.Module:
    """The module that holds `embeddings` (transformers 4 nests one more `vision_model` / `text_model`
    than transformers 5 does)."""
    while not hasattr(module, "embeddings"):
        module = getattr(module, inner)
    return module


def vision_links(family: str, vision: nn.Module, projection: nn.Module | None) -> list[Link]:
    """The links of a transformers vision tower (CLIPVisionModel, SiglipVisionModel, Siglip2VisionModel or
    the module inside them) and CLIP's visual_projection. CLIP's class embedding and the table's first row
    are not links: the class token's position vector is folded into it (`read_state`, `write_state`)."""
    core = _core(vision, "vision_model")
    emb = core.embeddings
    pos = emb.position_embedding.weight
    out = [
        Link(
            "visual.patch_embed.weight",
            [(emb.patch_embedding.weight, ALL)],
            "" if family == "siglip2" else "conv",
        )
    ]
    if emb.patch_embedding.bias is not None:
        out.append(Link("visual.patch_embed.bias", [(emb.patch_embedding.bias, ALL)]))
    out.append(Link("visual.posemb.table", [(pos, slice(1, None) if family == "clip" else ALL)], "table"))
    if family == "clip":
        out += _norm("visual.ln_pre", core.pre_layrnorm)
    out += _encoder_links("visual.blocks", core.encoder.layers, "attn.")
    out += _norm("visual.norm", core.post_layernorm)
    if family != "clip":
        head, W = core.head, pos.shape[1]
        mha = head.attention
        out += [
            Link("visual.head.probe", [(head.probe, ALL)], "vector"),
            Link("visual.head.q.weight", [(mha.in_proj_weight, slice(0, W))]),
            Link("visual.head.q.bias", [(mha.in_proj_bias, slice(0, W))]),
            Link("visual.head.kv.weight", [(mha.in_proj_weight, slice(W, None))]),
            Link("visual.head.kv.bias", [(mha.in_proj_bias, slice(W, None))]),
            *_linear("visual.head.proj", mha.out_proj),
            *_norm("visual.head.norm", head.layernorm),
            *_linear("visual.head.mlp.fc1", head.mlp.fc1),
            *_linear("visual.head.mlp.fc2", head.mlp.fc2),
        ]
    if projection is not None:
        out += _linear("image_proj", projection)
    return out


def text_links(family: str, text: nn.Module, projection: nn.Module | None) -> list[Link]:
    """The links of a transformers text tower (CLIPTextModel, SiglipTextModel, ...) and its projection
    (CLIP's text_projection; SigLIP's is the text model's own `head`)."""
    core = _core(text, "text_model")
    emb = core.embeddings
    out = [
        Link("text.token_embed.weight", [(emb.token_embedding.weight, ALL)]),
        Link("text.pos_embed", [(emb.position_embedding.weight, ALL)]),
        *_encoder_links("text.blocks", core.encoder.layers, ""),
        *_norm("text.norm", core.final_layer_norm),
    ]
    return out + _linear("text_proj", core.head if family != "clip" else projection)


def _links(family: str, hf: nn.Module, whole: bool) -> list[Link]:
    """Every link of a transformers model: its vision tower (and projection), and with `whole` its text
    tower, projection, logit scale and bias."""
    if whole:
        out = vision_links(family, hf.vision_model, getattr(hf, "visual_projection", None))
        out += text_links(family, hf.text_model, getattr(hf, "text_projection", None))
        out.append(Link("logit_scale", [(hf.logit_scale, ALL)], "vector"))
        if getattr(hf, "logit_bias", None) is not None:
            out.append(Link("logit_bias", [(hf.logit_bias, ALL)], "vector"))
        return out
    return vision_links(family, hf, getattr(hf, "visual_projection", None))


def _class_token(family: str, hf: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """CLIP's class embedding and position table (the class token's vector is row 0), else None."""
    if family != "clip":
        return None
    emb = _core(hf.vision_model if hasattr(hf, "text_model") else hf, "vision_model").embeddings
    return emb.class_embedding, emb.position_embedding.weight


def read_state(family: str, hf: nn.Module, whole: bool) -> dict[str, torch.Tensor]:
    """navit-clip's state dict of a transformers model (see `_links`)."""
    state = {link.key: link.read() for link in _links(family, hf, whole)}
    cls = _class_token(family, hf)
    if cls is not None:  # the class token only ever sits at position 0: its position vector is folded in
        state["visual.cls_token"] = cls[0].detach() + cls[1].detach()[0]
    return {k: v.float().contiguous().clone() for k, v in state.items()}


def write_state(family: str, hf: nn.Module, whole: bool, state: dict[str, torch.Tensor]) -> None:
    """Set every tensor of a transformers model from navit-clip's `state` (its keys are exactly the
    links' and the class token's: anything else is a bug)."""
    links = _links(family, hf, whole)
    cls = _class_token(family, hf)
    wanted = {link.key for link in links} | ({"visual.cls_token"} if cls else set())
    missing, unplaced = sorted(wanted - set(state)), sorted(set(state) - wanted)
    assert not missing and not unplaced, (missing[:3], unplaced[:3])
    for link in links:
        link.write(state[link.key])
    if cls is not None:
        with torch.no_grad():
            cls[0].copy_(state["visual.cls_token"])
            cls[1][0].zero_()


# ----------------------------------------------------------------------------------------------------
# transformers configs -> navit-clip configs (import)


def _act(name: str, where: str, source: str) -> str:
    if name not in HF_ACTS:
        raise ValueError(
            f"{source} has {where}.hidden_act={name!r}, which has no navit-clip counterpart "
            f"({', '.join(HF_ACTS)} convert)"
        )
    return HF_ACTS[name]


def _vision_config(family: str, v, source: str) -> tuple[VisionConfig, int]:
    """The VisionConfig of a transformers vision config, and the image side it was trained at."""
    if getattr(v, "num_channels", 3) != 3:
        raise ValueError(f"{source} has vision_config.num_channels={v.num_channels}; RGB (3) converts")
    if family != "clip" and not getattr(v, "vision_use_head", True):
        raise ValueError(
            f"{source} has vision_config.vision_use_head=false (no pooling head): only the MAP head converts"
        )
    P = v.patch_size
    G = round(v.num_patches**0.5) if family == "siglip2" else v.image_size // P
    if family == "siglip2" and G * G != v.num_patches:
        raise ValueError(f"{source} has vision_config.num_patches={v.num_patches}, not a square table")
    # image_size need not be a multiple of P (SO400M/14 at 384): transformers' strided patch conv then
    # reads the first G * P rows and columns alone, which is the grid navit-clip's table is trained at
    vision = VisionConfig(
        patch_size=P,
        width=v.hidden_size,
        depth=v.num_hidden_layers,
        heads=v.num_attention_heads,
        mlp_ratio=v.intermediate_size / v.hidden_size,
        qk_norm=False,
        bias=True,
        posemb="learned2d",
        max_grid=G,
        posemb_interp="bilinear" if family == "siglip2" else "bicubic",
        pool="cls" if family == "clip" else "map",
        patch_bias=family != "clip",
        ln_eps=v.layer_norm_eps,
        ln_pre=family == "clip",
        cls_token=family == "clip",
        act=_act(v.hidden_act, "vision_config", source),
        lock_grouping="openclip" if family == "clip" else "timm",
    )
    if int(vision.width * vision.mlp_ratio) != v.intermediate_size:
        raise ValueError(f"{source}: intermediate_size={v.intermediate_size} is not width x a ratio")
    return vision, G * P


def _text_config(family: str, t, source: str) -> tuple[TextConfig, int]:
    """The TextConfig of a transformers text config, and its embedding width (the projection's output).
    CLIP pools at its end-of-text token as transformers finds it: the first eos_token_id, or, where the
    config says eos_token_id 2 (transformers' legacy rule), the largest id."""
    if family == "clip":
        pool = "argmax" if t.eos_token_id == 2 else "eos"
    else:
        pool = "last"
    text = TextConfig(
        vocab_size=t.vocab_size,
        pad_id=t.pad_token_id if t.pad_token_id is not None else 0,
        eos_id=t.eos_token_id if pool == "eos" else -1,
        context_length=t.max_position_embeddings,
        width=t.hidden_size,
        depth=t.num_hidden_layers,
        heads=t.num_attention_heads,
        mlp_ratio=t.intermediate_size / t.hidden_size,
        pool=pool,
        ln_eps=t.layer_norm_eps,
        act=_act(t.hidden_act, "text_config", source),
        causal=family == "clip",
    )
    return text, getattr(t, "projection_size", None) or t.hidden_size


def _model_type(folder: Path) -> tuple[str, bool, dict]:
    """(family, whole, config.json) of a transformers folder, or a ValueError naming what it is."""
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder} has no config.json: it is not a transformers model folder")
    raw = json.loads(path.read_text())
    kind = raw.get("model_type")
    if kind not in MODEL_TYPES:
        raise ValueError(f"{folder} is a transformers {kind!r} model; {', '.join(MODEL_TYPES)} convert")
    return (*MODEL_TYPES[kind], raw)


def hf_class(family: str, whole: bool, architectures=()) -> type:
    """transformers' class for a family: the two-tower model, or the vision tower (CLIP's with its
    projection, where the folder's architectures say it has one)."""
    import transformers as tf

    if whole:
        return {"clip": tf.CLIPModel, "siglip": tf.SiglipModel, "siglip2": tf.Siglip2Model}[family]
    if family == "clip":
        plain = (
            "CLIPVisionModel" in (architectures or ())
            and "CLIPVisionModelWithProjection" not in architectures
        )
        return tf.CLIPVisionModel if plain else tf.CLIPVisionModelWithProjection
    return {"siglip": tf.SiglipVisionModel, "siglip2": tf.Siglip2VisionModel}[family]


def _normalize(folder: Path, family: str, source: str) -> str:
    """model.normalize of the folder's preprocessor_config.json (else the family's own)."""
    path = folder / "preprocessor_config.json"
    default = NORMALIZE["clip" if family == "clip" else "half"]
    pre = json.loads(path.read_text()) if path.is_file() else {}
    mean, std = tuple(pre.get("image_mean", default[0])), tuple(pre.get("image_std", default[1]))
    for name, (m, s) in NORMALIZE.items():
        if all(abs(a - b) < 1e-6 for a, b in zip(mean + std, m + s)):
            return name
    raise ValueError(f"{source} normalises images with mean {mean}, std {std}; navit-clip knows {NORMALIZE}")


def load_hf(folder: str | Path) -> tuple[nn.Module, str, bool]:
    """transformers' model of a local folder (nothing is downloaded), its family and whether it is the
    whole two-tower model; a weight the folder lacks is a ValueError (not a random initialisation)."""
    folder = Path(folder)
    family, whole, raw = _model_type(folder)
    cls = hf_class(family, whole, raw.get("architectures"))
    config = cls.config_class.from_pretrained(str(folder), local_files_only=True)
    _vision_config(family, config.vision_config if whole else config, str(folder))  # refused before loading
    if whole:
        _text_config(family, config.text_config, str(folder))
    try:
        hf, info = cls.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    except OSError as e:
        raise ValueError(f"{folder}: transformers cannot read its weights ({e})") from None
    missing = [k for k in info.get("missing_keys", ()) if "position_ids" not in k]
    if missing:
        raise ValueError(
            f"{folder} lacks {len(missing)} weight(s) of {cls.__name__}, e.g. {sorted(missing)[:3]}"
        )
    return hf.float().eval(), family, whole


def navit_config_of(hf: nn.Module, family: str, whole: bool, folder: Path) -> Config:
    """The navit-clip config of a loaded transformers model (its tokenizer: the folder's, where it has
    one). A vision tower alone gets navit-clip's default text tower, fresh, with open_clip's BPE."""
    source = str(folder)
    vision, size = _vision_config(family, hf.config.vision_config if whole else hf.config, source)
    projected = hasattr(hf, "visual_projection")  # CLIP's image projection (SigLIP's towers have none)
    embed_dim = hf.config.projection_dim if projected else vision.width
    if whole:
        text, text_dim = _text_config(family, hf.config.text_config, source)
        if text_dim != embed_dim and family != "clip":
            raise ValueError(
                f"{source}: text projection_size={text_dim} differs from the image width {vision.width}"
            )
        tokenizer = TokenizerConfig(kind="hf", layout="hf", context_length=text.context_length, source=source)
        if any((folder / f).exists() for f in TOKENIZER_FILES):
            tokenizer.path = source
    else:
        text, tokenizer = (
            TextConfig(),
            TokenizerConfig(kind="openclip", context_length=TextConfig.context_length),
        )
    cfg = Config()
    cfg.model = ModelConfig(
        vision=vision,
        text=text,
        embed_dim=embed_dim,
        logit_bias=family != "clip",
        image_proj="linear" if projected else "none",
        text_proj="linear_bias" if whole and family != "clip" else "linear",
    )
    cfg.data.patch_size = vision.patch_size
    # what the checkpoint was trained on: `navit-clip eval` notes budgets past it (config.trained_side)
    cfg.data.resolution.max_side, cfg.data.resolution.min_side = size, min(cfg.data.resolution.min_side, size)
    cfg.model.normalize = cfg.data.normalize = _normalize(folder, family, source)
    cfg.tokenizer = tokenizer
    if family != "clip":
        cfg.loss.kind = "sigmoid"
    cfg.model.validate()
    return cfg


def from_hf(folder: str | Path) -> tuple[nn.Module, Config, nn.Module]:
    """(NaViTCLIP, its config, transformers' model) of a local transformers folder, with equal weights."""
    from navit_clip.model.clip import NaViTCLIP
    from navit_clip.tokenizer import tokenizer_for

    folder = Path(folder)
    hf, family, whole = load_hf(folder)
    cfg = navit_config_of(hf, family, whole, folder)
    if cfg.tokenizer.path or not whole:  # it fits the embedding table; its pad id is recorded
        tokenizer_for(cfg, fixed_vocab=whole)
    navit = NaViTCLIP(cfg.model)
    state = read_state(family, hf, whole)
    if not whole:  # the stand-in text tower keeps its fresh weights
        state.update({k: v for k, v in navit.state_dict().items() if k.startswith(("text", "logit"))})
    navit.load_state_dict(state)
    return navit.eval(), cfg, hf


def convert_hf(folder: str | Path, out: str | Path) -> tuple[Path, bool]:
    """Write a navit-clip checkpoint (step 0, no optimiser state) of a local transformers folder: it
    evaluates, exports and trains with model.init_from=OUT like any navit-clip checkpoint. Returns the
    path and whether its text tower is fresh (the folder held a vision tower alone)."""
    from navit_clip.checkpoint import atomic_save
    from navit_clip.config import to_dict

    navit, cfg, hf = from_hf(folder)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fresh_text = not hasattr(hf, "text_model")
    source = {"hf_folder": str(folder), "fresh_text_tower": fresh_text}
    atomic_save({"model": navit.state_dict(), "config": to_dict(cfg), "step": 0, "source": source}, out)
    return out, fresh_text


def is_hf_folder(source: str | Path) -> bool:
    """Whether `navit-clip convert SRC` names a transformers folder (else an open_clip model)."""
    return Path(source).is_dir() and (Path(source) / "config.json").is_file()


# ----------------------------------------------------------------------------------------------------
# navit-clip -> transformers (export --format hf)


def hf_family(cfg: Config) -> str:
    """The transformers family whose vision tower computes this navit-clip tower, from its structure: a
    class token with pre-norm is CLIP's; a MAP head and no class token SigLIP's, its table resampled
    bilinearly per image SigLIP2 NaFlex's. Anything else is one ValueError naming the fields."""
    m, v = cfg.model, cfg.model.vision
    patch_bias = v.bias and not v.cls_token if v.patch_bias is None else v.patch_bias
    clip = v.cls_token
    want = {
        "posemb": "learned2d",
        "qk_norm": False,
        "bias": True,
        "fc_norm": False,
        "pool": "cls" if clip else "map",
        "ln_pre": clip,
        "patch_bias": not clip,
    }
    have = {**{k: getattr(v, k) for k in want}, "patch_bias": patch_bias}
    wrong = [f"model.vision.{k}={have[k]}" for k in want if have[k] != want[k]]
    if v.act not in ACTS:
        wrong.append(f"model.vision.act={v.act}")
    if m.image_proj not in (("linear", "none") if clip else ("none",)):
        wrong.append(f"model.image_proj={m.image_proj}")
    if wrong:
        options = ", ".join(f"{k}={str(x).lower()}" for k, x in want.items())
        kind = "CLIP" if clip else "SigLIP / SigLIP2"
        raise ValueError(
            f"this tower has no transformers counterpart: {', '.join(wrong)}; a {kind}-shaped tower exports "
            f"with --format hf ({options}{', image_proj=none' if not clip else ''}; configs/b16_siglip2.yaml "
            "trains one); the default export (no --format) takes every tower"
        )
    return "clip" if clip else ("siglip2" if v.posemb_interp == "bilinear" else "siglip")


def _sizes(tower: VisionConfig | TextConfig) -> dict:
    """transformers' encoder fields of a navit-clip tower (both towers name them alike)."""
    return dict(
        hidden_size=tower.width,
        intermediate_size=int(tower.width * tower.mlp_ratio),
        num_hidden_layers=tower.depth,
        num_attention_heads=tower.heads,
        hidden_act=ACTS[tower.act],
        layer_norm_eps=tower.ln_eps,
    )


def _hf_vision_config(family: str, cfg: Config):
    import transformers as tf

    v = cfg.model.vision
    common = dict(**_sizes(v), patch_size=v.patch_size)
    size = v.max_grid * v.patch_size
    if family == "clip":
        return tf.CLIPVisionConfig(**common, image_size=size, projection_dim=cfg.model.embed_dim)
    if family == "siglip":
        return tf.SiglipVisionConfig(**common, image_size=size)
    return tf.Siglip2VisionConfig(**common, num_patches=v.max_grid**2)


def _hf_text_config(family: str, cfg: Config, eos_id: int | None):
    """transformers' text config of the text tower, or a ValueError naming what has no counterpart."""
    import transformers as tf

    t, m = cfg.model.text, cfg.model
    clip = family == "clip"
    wrong = []
    if t.causal != clip:
        wrong.append(f"model.text.causal={t.causal}")
    if t.pool not in (("eot", "argmax", "eos") if clip else ("last",)):
        wrong.append(f"model.text.pool={t.pool}")
    if t.act not in ACTS:
        wrong.append(f"model.text.act={t.act}")
    if clip and m.text_proj == "linear_bias":
        wrong.append("model.text_proj=linear_bias")
    # transformers' CLIP pools at the first eos_token_id, except eos_token_id 2 (its legacy argmax rule)
    eos = {"argmax": 2, "eos": t.eos_id}.get(t.pool, eos_id)
    if clip and t.pool != "argmax" and eos == 2:
        wrong.append("an end-of-text id 2 (transformers' CLIPTextModel reads id 2 as its legacy argmax rule)")
    if wrong:
        raise ValueError(
            f"the text tower has no transformers counterpart: {', '.join(wrong)} (export without --with-text)"
        )
    common = dict(
        **_sizes(t),
        vocab_size=t.vocab_size,
        max_position_embeddings=t.context_length,
        pad_token_id=t.pad_id,
        eos_token_id=eos,
    )
    if clip:
        return tf.CLIPTextConfig(**common, projection_dim=m.embed_dim, bos_token_id=None)
    cls = tf.SiglipTextConfig if family == "siglip" else tf.Siglip2TextConfig
    return cls(**common, projection_size=m.embed_dim)


def _image_processor(family: str, cfg: Config, max_tokens: int):
    """transformers' own image processor that feeds the exported tower the pixels navit-clip expects:
    CLIP's resize + centre crop, SigLIP's square resize, at the tower's size; SigLIP2's NaFlex patches
    at up to `max_tokens` a image."""
    import transformers as tf

    mean, std = (list(x) for x in NORMALIZE[cfg.model.normalize])
    v = cfg.model.vision
    S = v.max_grid * v.patch_size
    if family == "clip":
        return tf.CLIPImageProcessor(
            size={"shortest_edge": S}, crop_size={"height": S, "width": S}, image_mean=mean, image_std=std
        )
    if family == "siglip":
        return tf.SiglipImageProcessor(size={"height": S, "width": S}, image_mean=mean, image_std=std)
    return tf.Siglip2ImageProcessor(
        patch_size=v.patch_size, max_num_patches=max_tokens, image_mean=mean, image_std=std
    )


def _export_tokenizer(cfg: Config, out: Path, family: str):
    """Write the text tower's tokenizer as transformers files into `out`; returns its end-of-text id."""
    from navit_clip.tokenizer import load_hf_tokenizer, tokenizer_for, write_clip_tokenizer

    t = cfg.tokenizer
    if t.kind == "openclip" and family != "clip":
        # a bidirectional tower reads its padding: open_clip pads with id 0, which transformers'
        # CLIPTokenizer can name only as "!" (then tokenizing a real "!" as 0 too)
        raise ValueError(
            "--with-text --format hf: a SigLIP-shaped text tower reads its padding, and open_clip's BPE pads "
            "with id 0, which no transformers tokenizer reproduces; train it with a Hugging Face tokenizer "
            "(tokenizer.kind=hf, layout=hf), or export the image tower alone (no --with-text)"
        )
    if t.kind == "openclip":  # openai's layout: padded with end-of-text (a causal tower never reads it)
        write_clip_tokenizer(out, t.context_length, pad_token="<|endoftext|>")
        return tokenizer_for(cfg, fixed_vocab=True).inner.eot_token_id
    if t.kind != "hf" or t.layout != "hf" or t.clean != "none":
        raise ValueError(
            f"--with-text --format hf writes transformers tokenizer files for open_clip's BPE and for a "
            f"Hugging Face tokenizer called as is (tokenizer.layout=hf, clean=none); this model's is "
            f"kind={t.kind}, layout={t.layout}, clean={t.clean}: export without --with-text"
        )
    tok = tokenizer_for(cfg, fixed_vocab=True)
    hf_tok = load_hf_tokenizer(t.path)
    hf_tok.model_max_length = t.context_length
    hf_tok.save_pretrained(out)
    return tok.eos_id


def export_hf(
    checkpoint: str | Path, out: str | Path, with_text: bool = False, max_tokens: int = 256
) -> Path:
    """A folder transformers loads as its own class, no remote code: CLIPVisionModelWithProjection,
    SiglipVisionModel or Siglip2VisionModel (with `with_text` CLIPModel, SiglipModel or Siglip2Model and
    the tokenizer's files), one model.safetensors, and preprocessor_config.json for its image processor."""
    from navit_clip.factory import config_of, create_model

    cfg = config_of(checkpoint)
    family = hf_family(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = create_model(checkpoint).state_dict()
    vision_cfg = _hf_vision_config(family, cfg)
    if family == "clip" and cfg.model.image_proj == "none":  # CLIP's projection as the identity
        state["image_proj.weight"] = torch.eye(cfg.model.vision.width)
    if with_text:
        text_cfg = _hf_text_config(family, cfg, _export_tokenizer(cfg, out, family))
        if cfg.model.text_proj != "linear_bias" and family != "clip":  # SigLIP's text head has a bias
            state["text_proj.bias"] = torch.zeros(cfg.model.embed_dim)
        if cfg.model.text_proj == "none":
            state["text_proj.weight"] = torch.eye(cfg.model.embed_dim)
        if family != "clip" and "logit_bias" not in state:
            state["logit_bias"] = torch.zeros(1)
        cls = hf_class(family, True)
        config = cls.config_class(text_config=text_cfg.to_dict(), vision_config=vision_cfg.to_dict())
        if family == "clip":
            config.projection_dim = cfg.model.embed_dim
    else:
        cls, config = hf_class(family, False), vision_cfg
        state = {k: t for k, t in state.items() if k.startswith(("visual.", "image_proj."))}
    hf = cls(config).eval()
    write_state(family, hf, with_text, state)
    hf.save_pretrained(out, max_shard_size="1000GB")
    _image_processor(family, cfg, max_tokens).save_pretrained(out)
    return out


def hf_table_markdown() -> str:
    """docs/converting.md's table of what converts from and exports to transformers, by family, from
    MODEL_TYPES and hf_class (tests/test_hf.py checks the docs hold it)."""
    rows = [
        "| family | `navit-clip convert` reads (model_type: class) | `export --format hf` writes | with `--with-text` |",
        "|---|---|---|---|",
    ]
    for family in ("clip", "siglip", "siglip2"):
        types = [t for t, (f, _) in MODEL_TYPES.items() if f == family]
        reads = []
        for t in types:
            whole = MODEL_TYPES[t][1]
            classes = {hf_class(family, whole).__name__}
            if family == "clip" and not whole:
                classes.add(hf_class(family, whole, ["CLIPVisionModel"]).__name__)
            reads.append(f"`{t}`: {', '.join(sorted(classes))}")
        rows.append(
            f"| {family} | {'; '.join(reads)} | {hf_class(family, False).__name__} | {hf_class(family, True).__name__} |"
        )
    return "\n".join(rows)
