"""open_clip's own ViT image tower (open_clip.transformer.VisionTransformer) -> the NaViT options that
are CLIP's ViT: a class token per image (`cls_token`, pooled as `pool=cls`), one learned 2D position
table of the checkpoint's grid resampled to each image's rows x columns as timm's
`resample_abs_pos_embed` does (`posemb=learned2d`), `ln_pre`, biases, no qk-norm, the final LayerNorm
and the projection, QuickGELU for OpenAI's weights. Reads the `visual.*` keys only."""

from __future__ import annotations

import torch

from navit_clip.model.vision import VisionConfig

# open_clip's CustomResidualAttentionBlock options, in either tower, with the value that converts
PLAIN_BLOCK = {
    "ls_init_value": None,
    "block_type": None,
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
}
VISION_PLAIN = {"attentional_pool": False, **PLAIN_BLOCK}


def refuse_fields(fields: dict, plain: dict, where: str, model: str, what: str) -> None:
    """A ValueError naming the first field of `fields` that differs from its converting value."""
    for key, ok in plain.items():
        if fields.get(key, ok) not in (ok, "default"):
            raise ValueError(
                f"{model} has {where}.{key}={fields[key]!r}: only {what} converts ({where}.{key}={ok!r})"
            )


def vision_config(oc_cfg: dict, model: str) -> tuple[VisionConfig, str, int]:
    """The VisionConfig of an open_clip ViT config, its image projection kind and its image size."""
    v = dict(oc_cfg.get("vision_cfg", {}))
    if isinstance(v.get("layers", 12), (list, tuple)):
        raise ValueError(f"{model}'s image tower is a ResNet (vision_cfg.layers={v['layers']}), not a ViT")
    refuse_fields(v, VISION_PLAIN, "vision_cfg", model, "open_clip's own plain ViT")
    size = square_size(v.get("image_size", 224), model)
    P = v.get("patch_size", 16)
    pool = {"tok": "cls", "avg": "mean"}.get(v.get("pool_type", "tok"))
    if pool is None or (pool == "mean" and v.get("final_ln_after_pool", False)):
        raise ValueError(
            f"{model} has vision_cfg.pool_type={v.get('pool_type')!r} "
            f"(final_ln_after_pool={v.get('final_ln_after_pool', False)}); 'tok', or 'avg' with the norm "
            "before pooling, converts"
        )
    if v.get("act_kwargs"):
        raise ValueError(f"{model} has vision_cfg.act_kwargs={v['act_kwargs']}; plain GELU converts")
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
        act="quick_gelu" if oc_cfg.get("quick_gelu", False) else "gelu",
    )
    return vision, "linear", size


def square_size(size, model: str) -> int:
    if isinstance(size, (list, tuple)):
        if size[0] != size[1]:
            raise ValueError(f"{model} has a non-square vision_cfg.image_size={size}; a square one converts")
        size = size[0]
    return size


def vision_state(vis: torch.nn.Module, cfg: VisionConfig) -> dict[str, torch.Tensor]:
    """navit-clip's `visual.*` and `image_proj.*` tensors of open_clip's VisionTransformer `vis`."""
    G, W = cfg.max_grid, cfg.width
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
        "visual.norm.weight": vis.ln_post.weight,
        "visual.norm.bias": vis.ln_post.bias,
        "image_proj.weight": vis.proj.detach().t(),
    }
    if cfg.ln_pre:
        out["visual.ln_pre.weight"], out["visual.ln_pre.bias"] = vis.ln_pre.weight, vis.ln_pre.bias
    out.update(resblocks_state(vis.transformer.resblocks, "visual.blocks", "attn."))
    return out


def resblocks_state(blocks, prefix: str, attn: str) -> dict[str, torch.Tensor]:
    """open_clip's ResidualAttentionBlocks (nn.MultiheadAttention inside) as navit-clip blocks:
    `attn` is where a block keeps qkv / proj ("attn." in the image tower, "" in the text tower)."""
    out = {}
    for i, b in enumerate(blocks):
        p = f"{prefix}.{i}."
        a = p + attn
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
    return out
