"""A SigLIP-shaped open_clip model at the races' ViT-Ti size, for the fine-tune race (`--shape siglip`).

What makes a checkpoint SigLIP's, kept: open_clip's `CustomTextCLIP` around a timm
`VisionTransformer` image tower with no class token and an attention-pool (MAP) head whose output is the
embedding (`timm_pool: map`, `timm_proj: none`: `vit_base_patch16_siglip_224`'s options), a bidirectional
text tower pooled at its last position with a biased projection and LayerNorm eps 1e-6, and the sigmoid
loss with a learned bias (open_clip's `SigLipLoss`, `--siglip` in its trainer), its bias starting at the
prior that one pair in a batch is positive (-log 64 here; SigLIP's -10 is that prior at its 32k batches).
What is the race's instead: the size (ViT-Ti: width 192, 6 blocks, 96 x 96 px, a 6 x 6 table), open_clip's
BPE tokenizer (SigLIP's SentencePiece vocabulary is a download) and open_clip's default (CLIP's) pixel
normalisation, which its transforms use for a checkpoint file.

The tower is a timm model registered under `TIMM_NAME` in timm's `vision_transformer` module, built by
timm's own `_create_vision_transformer`, so every process that builds it (this one, the release's
trainer, open_clip main's `--use-naflex`, which converts a `vision_transformer` model to NaFlexViT with
timm's `use_naflex`) builds the same layers: importing this module registers it.
"""

from __future__ import annotations

import math

import timm
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from timm.models import register_model
from timm.models import vision_transformer as vt

TIMM_NAME = "race_vit_ti_patch16_siglip_96"
SIZE, WIDTH = 96, 192
SIGLIP_CONFIG = {
    "embed_dim": WIDTH,  # the MAP head's output is the embedding (timm_proj none)
    # the bias's prior: one pair in a batch is positive, -log(64) at the race's batch (learning_race's
    # OPENCLIP_BATCH; not imported: the trainers' processes import this module alone); SigLIP's -10 is
    # that prior for its 32k batches, and at 64 it collapsed (bench/NOTES.md, seventeenth round)
    "init_logit_bias": -math.log(64),
    "init_logit_scale": math.log(10),  # open_clip_train's with --siglip
    "custom_text": True,
    "vision_cfg": {
        "image_size": SIZE,
        "timm_model_name": TIMM_NAME,
        "timm_model_pretrained": False,
        "timm_pool": "map",
        "timm_proj": "none",
    },
    "text_cfg": {
        "context_length": 32,
        "vocab_size": 49408,
        "width": WIDTH,
        "heads": 3,
        "layers": 4,
        "no_causal_mask": True,
        "proj_bias": True,
        "pool_type": "last",
        "norm_kwargs": {"eps": 1e-6},
    },
}


def _race_vit_ti_siglip(pretrained: bool = False, **kwargs):
    args = dict(
        img_size=SIZE,
        patch_size=16,
        embed_dim=WIDTH,
        depth=6,
        num_heads=3,
        class_token=False,
        global_pool="map",
    )
    # SigLIP's variant for timm's defaults (filters); its weights are never fetched. Its pixel statistics
    # are open_clip's defaults, which its transforms use for a checkpoint file with no pretrained tag
    model = vt._create_vision_transformer(
        "vit_base_patch16_siglip_224", pretrained=False, **{**args, **kwargs}
    )
    model.pretrained_cfg = model.default_cfg = {
        **model.pretrained_cfg,
        "mean": OPENAI_DATASET_MEAN,
        "std": OPENAI_DATASET_STD,
    }
    return model


if not timm.is_model(TIMM_NAME):
    _race_vit_ti_siglip.__name__ = TIMM_NAME
    _race_vit_ti_siglip.__module__ = vt.__name__  # open_clip main converts vision_transformer models
    register_model(_race_vit_ti_siglip)


def build(config: dict):
    """open_clip's model of a race config (CLIP, or CustomTextCLIP for `custom_text`), as its factory
    builds it."""
    import open_clip

    kwargs = {k: v for k, v in config.items() if k != "custom_text"}
    return open_clip.CustomTextCLIP(**kwargs) if config.get("custom_text") else open_clip.CLIP(**kwargs)
