"""timm ViT image towers (open_clip's TimmModel around timm's VisionTransformer or NaFlexViT: SigLIP,
SigLIP2 and its NaFlex models, timm's `vit_*_clip_*`) -> the NaViT options that compute the same
function per image: the attention-pool head (`pool=map`: one learned latent query), avg (`mean`) or
class-token (`cls`) pooling, `fc_norm`, `norm_pre` (`ln_pre`), the patch projection's bias, GELU (exact
or tanh) or QuickGELU, and the learned 2D position table resampled to each image's grid as the
checkpoint's own code does: antialiased bicubic (timm's `resample_abs_pos_embed`) for the fixed-size
ViTs, NaFlexViT's own per-image interpolation (bilinear for its SigLIP models) for NaFlexViT.

The tower is read from the timm module itself, not from its name: every layer type, flag and shape is
checked, and what NaViT has no option for (register tokens, layer scale, qk-norm, rotary embeddings,
SwiGLU, a conv stem, ...) is a ValueError naming it. Reads the `visual.trunk.*` / `visual.head.*` keys
only."""

from __future__ import annotations

import torch
from torch import nn

from navit_clip.model.vision import VisionConfig


def build_trunk(oc_cfg: dict, model: str) -> nn.Module:
    """open_clip's TimmModel of the config, on the meta device (shapes and layer types, no memory)."""
    from open_clip.timm_model import TimmModel

    v = oc_cfg.get("vision_cfg", {})
    try:
        import timm

        if not timm.is_model(v["timm_model_name"]):
            raise ValueError(
                f"{model}'s image tower is timm's {v['timm_model_name']}, which timm {timm.__version__} "
                "does not know (a newer timm?)"
            )
        with torch.device("meta"):
            return TimmModel(
                v["timm_model_name"],
                oc_cfg["embed_dim"],
                image_size=v.get("image_size", 224),
                pool=v.get("timm_pool", "avg"),
                proj=v.get("timm_proj", "linear"),
                proj_bias=v.get("timm_proj_bias", False),
            )
    except (AssertionError, RuntimeError, TypeError, KeyError) as e:
        raise ValueError(f"{model}'s timm tower {v.get('timm_model_name')} does not build: {e}") from None


def _family():
    from timm.layers import AttentionPoolLatent, PatchEmbed
    from timm.layers.attention import Attention
    from timm.layers.mlp import Mlp
    from timm.models.naflexvit import NaFlexVit
    from timm.models.vision_transformer import Block, VisionTransformer

    return VisionTransformer, NaFlexVit, Block, Attention, Mlp, PatchEmbed, AttentionPoolLatent


def _act(module: nn.Module, where: str, model: str) -> str:
    from timm.layers.activations import GELUTanh, QuickGELU

    if isinstance(module, GELUTanh) or (isinstance(module, nn.GELU) and module.approximate == "tanh"):
        return "gelu_tanh"
    if isinstance(module, nn.GELU) or type(module).__name__ == "GELU":
        return "gelu"
    if isinstance(module, QuickGELU):
        return "quick_gelu"
    raise ValueError(f"{model}'s {where} activation is {type(module).__name__}; GELU or QuickGELU converts")


def _is_identity(m) -> bool:
    return m is None or isinstance(m, (nn.Identity, nn.Dropout))


def _embedding(trunk, naflex: bool, refuse) -> tuple[int, int, int, str]:
    """(patch size, table side, width, table interpolation) of the patch and position embedding."""
    _, _, _, _, _, PatchEmbed, _ = _family()
    embed = trunk.embeds if naflex else trunk.patch_embed
    if naflex:
        if getattr(trunk, "rope", None) is not None:
            refuse("rotary position embeddings")
        if (
            embed.pos_embed_type != "learned"
            or embed.pos_embed_ar_preserving
            or embed.pos_embed_use_grid_sample
        ):
            refuse(
                f"a {embed.pos_embed_type} position embedding (aspect-preserving="
                f"{embed.pos_embed_ar_preserving}, grid_sample={embed.pos_embed_use_grid_sample})"
            )
        if not embed.pos_embed_antialias or embed.pos_embed_align_corners:
            refuse("a position table resampled without antialiasing or with align_corners")
        if embed.pos_embed_interp_mode not in ("bicubic", "bilinear"):
            refuse(f"position tables resampled by {embed.pos_embed_interp_mode!r}")
        if not embed.is_linear or embed.norm_input is not None or not _is_identity(embed.norm):
            refuse("a patch embedding that is not one linear projection")
        if getattr(embed, "patch_interpolator", None) is not None:
            refuse("variable patch sizes")
        _, Gh, Gw, W = embed.pos_embed.shape
        interp = embed.pos_embed_interp_mode
    else:
        if type(embed) is not PatchEmbed or not _is_identity(embed.norm):
            refuse(f"a {type(embed).__name__} patch embedding (a plain patchify-and-project converts)")
        if trunk.pos_embed is None:
            refuse("no position embedding")
        (Gh, Gw), W, interp = embed.grid_size, trunk.embed_dim, "bicubic"
        if trunk.pos_embed.shape[1] != Gh * Gw + (trunk.has_class_token and not trunk.no_embed_class):
            refuse(f"a position table of {trunk.pos_embed.shape[1]} rows for a {Gh} x {Gw} grid")
    if Gh != Gw:
        refuse(f"a non-square {Gh} x {Gw} position table")
    if embed.patch_size[0] != embed.patch_size[1]:
        refuse(f"non-square patches {embed.patch_size}")
    return embed.patch_size[0], Gh, W, interp


def _blocks(blocks: list, model: str, refuse) -> tuple[list[nn.Module], str]:
    """The blocks' LayerNorms and their one activation, every block checked to be a plain pre-LN one."""
    _, _, Block, Attention, Mlp, _, _ = _family()
    if not blocks:
        refuse("no blocks")
    norms = []
    for i, b in enumerate(blocks):
        if type(b) is not Block or type(b.attn) is not Attention or type(b.mlp) is not Mlp:
            refuse(f"a {type(b).__name__} / {type(b.attn).__name__} / {type(b.mlp).__name__} block {i}")
        if not (_is_identity(b.ls1) and _is_identity(b.ls2)):
            refuse("layer scale")
        if not (_is_identity(b.attn.q_norm) and _is_identity(b.attn.k_norm)):
            refuse("qk-norm")
        if not _is_identity(getattr(b.attn, "norm", None)) or not _is_identity(b.mlp.norm):
            refuse("a norm inside attention or the MLP (scale_attn_norm / scale_mlp_norm)")
        if getattr(b.attn, "qkv", None) is None or getattr(b.mlp, "fc1", None) is None:
            refuse("separate q / k / v projections or a gated MLP")
        norms += [b.norm1, b.norm2]
    acts = {_act(b.mlp.act, "MLP", model) for b in blocks}
    if len(acts) > 1:
        refuse(f"activations {sorted(acts)} in different blocks")
    return norms, acts.pop()


def _pooling(trunk, b0, act: str, model: str, refuse) -> tuple[str, list[nn.Module], list[bool]]:
    """The pool kind, the pooling head's LayerNorms and whether its dense layers have biases."""
    _, _, _, _, _, _, AttentionPoolLatent = _family()
    ap = getattr(trunk, "attn_pool", None)
    if ap is None:
        if trunk.global_pool == "avg":
            return "mean", [], []
        if trunk.global_pool == "token" and trunk.has_class_token:
            return "cls", [], []
        refuse(f"global_pool={trunk.global_pool!r} (map, avg or token converts)")
    if type(ap) is not AttentionPoolLatent:
        refuse(f"a {type(ap).__name__} pooling head")
    if ap.latent_len != 1 or ap.pos_embed is not None or ap.mlp is None:
        refuse("an attention-pool head with several latents, a position table or no MLP")
    if not (_is_identity(ap.q_norm) and _is_identity(ap.k_norm)):
        refuse("qk-norm in the attention-pool head")
    if ap.num_heads != b0.attn.num_heads or ap.mlp.fc1.out_features != b0.mlp.fc1.out_features:
        refuse("an attention-pool head with other heads or MLP width than the blocks")
    if not isinstance(ap.q, nn.Linear):
        refuse("an attention-pool head without a query projection")
    if _act(ap.mlp.act, "attention-pool", model) != act:
        refuse("another activation in the attention-pool head than in the blocks")
    return "map", [ap.norm], [layer.bias is not None for layer in (ap.q, ap.kv, ap.proj)]


def vision_config(trunk_model: nn.Module, image_size, model: str) -> tuple[VisionConfig, str, int]:
    """The VisionConfig of open_clip's TimmModel `trunk_model` (meta or real), its image projection kind
    (open_clip's head, or timm's own head used as the projection) and the image size it was made for."""
    VisionTransformer, NaFlexVit, *_ = _family()
    trunk = trunk_model.trunk

    def refuse(what: str):
        raise ValueError(
            f"{model}'s image tower (timm {type(trunk).__name__}) has {what}; it does not convert"
        )

    naflex = type(trunk) is NaFlexVit
    if type(trunk) is not VisionTransformer and not naflex:
        refuse("no plain ViT / NaFlexViT trunk (ConvNeXt, EVA, FastViT, ... are other architectures)")
    if getattr(trunk, "num_reg_tokens", 0):
        refuse(f"{trunk.num_reg_tokens} register token(s)")
    P, G, W, interp = _embedding(trunk, naflex, refuse)
    blocks = list(trunk.blocks)
    norms, act = _blocks(blocks, model, refuse)
    b0 = blocks[0]
    pool, pool_norms, pool_biases = _pooling(trunk, b0, act, model, refuse)
    if getattr(trunk, "pool_include_prefix", False) and trunk.has_class_token and pool != "cls":
        refuse("pooling that includes the class token")
    if _is_identity(trunk.norm) == _is_identity(trunk.fc_norm):
        refuse("no final norm (or two)")
    norms += [trunk.norm if _is_identity(trunk.fc_norm) else trunk.fc_norm, *pool_norms]
    norms += [] if _is_identity(trunk.norm_pre) else [trunk.norm_pre]
    if any(type(n).__name__ not in ("LayerNorm", "LayerNormFp32") for n in norms):
        refuse(
            f"a {next(type(n).__name__ for n in norms if type(n).__name__ != 'LayerNorm')} (LayerNorm converts)"
        )
    eps = {float(n.eps) for n in norms}
    if len(eps) > 1:
        refuse(f"LayerNorms of different eps {sorted(eps)}")
    biases = [l.bias is not None for l in (b0.attn.qkv, b0.attn.proj, b0.mlp.fc1, b0.mlp.fc2)] + pool_biases
    if len(set(biases)) > 1:
        refuse("biases in some dense layers and not others")
    hidden = b0.mlp.fc1.out_features
    if int(W * (hidden / W)) != hidden:
        refuse(f"an MLP width {hidden} that width x ratio does not give back")
    vision = VisionConfig(
        patch_size=P,
        width=W,
        depth=len(blocks),
        heads=b0.attn.num_heads,
        mlp_ratio=hidden / W,
        qk_norm=False,
        bias=biases[0],
        posemb="learned2d",
        max_grid=G,
        posemb_interp=interp,
        pool=pool,
        fc_norm=not _is_identity(trunk.fc_norm),
        patch_bias=(trunk.embeds if naflex else trunk.patch_embed).proj.bias is not None,
        ln_eps=eps.pop(),
        ln_pre=not _is_identity(trunk.norm_pre),
        cls_token=trunk.has_class_token,
        act=act,
        # open_clip's TimmModel.lock: timm's group_matcher's groups; timm's own head locks, open_clip's never
        lock_grouping="timm_naflex" if naflex else "timm",
        lock_proj=not _is_identity(trunk.head),
    )
    proj = _projection(trunk, trunk_model.head, model, refuse)
    return vision, proj, image_size[0] if isinstance(image_size, (list, tuple)) else image_size


def _projection(trunk, head, model, refuse) -> str:
    """open_clip's head after the trunk (a Linear `proj`), timm's classifier head kept as the
    projection (timm_proj null), or none."""
    timm_head = None if _is_identity(trunk.head) else trunk.head
    oc_layers = [m for m in head.children() if not isinstance(m, nn.Dropout)]
    if timm_head is not None and oc_layers:
        refuse("two projections")
    layer = timm_head if timm_head is not None else (oc_layers[0] if oc_layers else None)
    if layer is None:
        return "none"
    if type(layer) is not nn.Linear or len(oc_layers) > 1:
        refuse(f"a {type(layer).__name__} projection head (a linear one converts)")
    return "linear_bias" if layer.bias is not None else "linear"


def vision_state(trunk_model: nn.Module, cfg: VisionConfig, proj: str) -> dict[str, torch.Tensor]:
    """navit-clip's `visual.*` and `image_proj.*` tensors of open_clip's TimmModel `trunk_model`."""
    trunk = trunk_model.trunk
    naflex = hasattr(trunk, "embeds")
    embed = trunk.embeds if naflex else trunk.patch_embed
    G, W = cfg.max_grid, cfg.width
    weight = embed.proj.weight.detach()
    out = {"visual.patch_embed.weight": weight if naflex else weight.permute(0, 2, 3, 1).reshape(W, -1)}
    if embed.proj.bias is not None:
        out["visual.patch_embed.bias"] = embed.proj.bias
    pos = (embed.pos_embed if naflex else trunk.pos_embed).detach().reshape(-1, W)
    cls = embed.cls_token if naflex else trunk.cls_token
    if cls is not None:
        cls = cls.detach().reshape(W)
        if not naflex and not trunk.no_embed_class:  # its position vector folded in (it sits at 0 only)
            cls, pos = cls + pos[0], pos[1:]
        out["visual.cls_token"] = cls
    out["visual.posemb.table"] = pos.reshape(G, G, W)
    if cfg.ln_pre:
        out.update(_params("visual.ln_pre", trunk.norm_pre))
    out.update(_params("visual.norm", trunk.fc_norm if cfg.fc_norm else trunk.norm))
    for i, b in enumerate(trunk.blocks):
        p = f"visual.blocks.{i}"
        for ours, theirs in (
            ("norm1", b.norm1),
            ("attn.qkv", b.attn.qkv),
            ("attn.proj", b.attn.proj),
            ("norm2", b.norm2),
            ("mlp.fc1", b.mlp.fc1),
            ("mlp.fc2", b.mlp.fc2),
        ):
            out.update(_params(f"{p}.{ours}", theirs))
    if cfg.pool == "map":
        ap = trunk.attn_pool
        out["visual.head.probe"] = ap.latent.detach().reshape(W)
        for ours, theirs in (
            ("q", ap.q),
            ("kv", ap.kv),
            ("proj", ap.proj),
            ("norm", ap.norm),
            ("mlp.fc1", ap.mlp.fc1),
            ("mlp.fc2", ap.mlp.fc2),
        ):
            out.update(_params(f"visual.head.{ours}", theirs))
    if proj != "none":
        layer = trunk.head if not _is_identity(trunk.head) else trunk_model.head.proj
        out.update(_params("image_proj", layer))
    return out


def _params(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": t for k, t in module.named_parameters(recurse=False)}
