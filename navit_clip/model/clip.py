"""The two-tower NaViT-CLIP model with open_clip's API: encode_image, encode_text, logit_scale.

Shape legend: B sequences, E slots per sequence, K context length, D embedding width, N images.
The model reads no files and knows nothing of the objective: it returns embeddings and the
temperature (and bias) parameters; the loss lives in navit_clip/loss.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from navit_clip.model.layers import PROJECTIONS, projection
from navit_clip.model.text import TextConfig, TextTransformer
from navit_clip.model.vision import NaViT, VisionConfig
from navit_clip.packing import PackedBatch

# The pixel normalisation a model was trained with, by name (model.normalize -> (mean, std)): the model
# owns its preprocessing; the data pipeline and the exporter read it from here.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
HALF_MEAN, HALF_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # SigLIP's, and timm's inception constants
NORMALIZE = {"clip": (CLIP_MEAN, CLIP_STD), "half": (HALF_MEAN, HALF_STD)}


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 512
    init_logit_scale: float = math.log(1 / 0.07)
    logit_bias: bool = False  # a learnable bias for the sigmoid (SigLIP) loss
    init_logit_bias: float = -10.0
    # each tower's projection into the embedding space (layers.PROJECTIONS): linear (CLIP's, no bias),
    # linear_bias (SigLIP's text tower), none (SigLIP's image towers: width == embed_dim)
    image_proj: str = "linear"
    text_proj: str = "linear"
    normalize: str = "clip"  # the pixel normalisation the model expects (NORMALIZE); data.normalize follows
    # Start from these weights: a navit-clip checkpoint, e.g. one `navit-clip convert-openclip` wrote.
    # Its model architecture, tokenizer and image normalisation are the run's (config.load_config).
    init_from: str = ""

    def validate(self) -> None:
        self.vision.validate()
        self.text.validate()
        if self.embed_dim < 1:
            raise ValueError(f"model.embed_dim={self.embed_dim} must be positive")
        if self.normalize not in NORMALIZE:
            raise ValueError(f"model.normalize={self.normalize!r} must be one of {tuple(NORMALIZE)}")
        for name, width in (("image_proj", self.vision.width), ("text_proj", self.text.width)):
            kind = getattr(self, name)
            if kind not in PROJECTIONS:
                raise ValueError(f"model.{name}={kind!r} is not one of {PROJECTIONS}")
            if kind == "none" and width != self.embed_dim:
                raise ValueError(
                    f"model.{name}=none needs model.embed_dim={self.embed_dim} equal to the tower's width {width}"
                )


class NaViTCLIP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.visual = NaViT(cfg.vision)
        self.text = TextTransformer(cfg.text)
        self.image_proj = projection(cfg.image_proj, cfg.vision.width, cfg.embed_dim)
        self.text_proj = projection(cfg.text_proj, cfg.text.width, cfg.embed_dim)
        # shape [1], not 0-d: FSDP2 shards parameters along dim 0
        self.logit_scale = nn.Parameter(torch.full((1,), cfg.init_logit_scale))
        self.logit_bias = nn.Parameter(torch.full((1,), cfg.init_logit_bias)) if cfg.logit_bias else None
        for proj, width in ((self.image_proj, cfg.vision.width), (self.text_proj, cfg.text.width)):
            if isinstance(proj, nn.Linear):
                nn.init.normal_(proj.weight, std=width**-0.5)
                if proj.bias is not None:
                    nn.init.zeros_(proj.bias)

    # The public encode_* methods are entry points only (nothing in the model calls them), so that
    # FSDP2 can treat each as a forward (navit_clip.distributed.wrap_model registers them); the
    # training forward and they share the private _image / _text.
    def lock_towers(self) -> list[str]:
        """Freeze what model.vision.lock / model.text.lock ask (open_clip's lock_image_tower and
        lock_text_tower): every parameter of a locked tower and its projection stops requiring grad,
        except the last `lock_unlocked_groups` groups (the projection is the last group) and, with
        `lock_norms=false`, the LayerNorms. Returns the names of the frozen parameters."""
        for tower, proj, cfg in (
            (self.visual, self.image_proj, self.cfg.vision),
            (self.text, self.text_proj, self.cfg.text),
        ):
            if not cfg.lock:
                continue
            if tower is self.visual:
                groups = tower.lock_groups(list(proj.parameters()))
            else:
                groups = [*tower.lock_groups(), list(proj.parameters())]
            for i, group in enumerate(groups):
                for param in group:
                    param.requires_grad_(i >= len(groups) - cfg.lock_unlocked_groups)
            if not cfg.lock_norms:
                for m in tower.modules():
                    if isinstance(m, nn.LayerNorm):
                        m.requires_grad_(True)
        return [name for name, param in self.named_parameters() if not param.requires_grad]

    def _image(self, images: PackedBatch, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.visual(images)
        emb_BED = self.image_proj(out.pooled)
        return (F.normalize(emb_BED, dim=-1) if normalize else emb_BED), out.slot_valid

    def _text(self, ids_NK: torch.Tensor, normalize: bool) -> torch.Tensor:
        """Each distinct caption is encoded once: a batch of a classification set's template captions,
        or of web data's repeated alt texts, holds many copies, and the tower reads every caption
        alone, so the copies' rows are the same numbers and their gradients add up as before
        (bench/NOTES.md, twenty-first round). Skipped where nothing repeats, and under a compiler."""
        inverse_N = None
        if ids_NK.shape[0] > 1 and not torch.compiler.is_compiling():
            unique_UK, inverse = torch.unique(ids_NK, dim=0, return_inverse=True)
            if unique_UK.shape[0] < ids_NK.shape[0]:
                ids_NK, inverse_N = unique_UK, inverse
        emb_ND = self.text_proj(self.text(ids_NK))
        emb_ND = F.normalize(emb_ND, dim=-1) if normalize else emb_ND
        return emb_ND if inverse_N is None else emb_ND[inverse_N]

    def encode_packed(self, images: PackedBatch, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed images -> per-slot embeddings [B, E, D] and the slot mask [B, E]."""
        return self._image(images, normalize)

    def encode_image(
        self, images: PackedBatch | Sequence[torch.Tensor], normalize: bool = False
    ) -> torch.Tensor:
        """open_clip-style: a list of [3, H, W] images (any sizes) -> [N, D] in input order.

        A PackedBatch gives [B, E, D] (use encode_packed for the slot mask as well).
        """
        if isinstance(images, PackedBatch):
            return self._image(images, normalize)[0]
        emb_ND = self.image_proj(self.visual.encode_images(list(images)))
        return F.normalize(emb_ND, dim=-1) if normalize else emb_ND

    def encode_text(self, ids_NK: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self._text(ids_NK, normalize)

    def forward(self, images: PackedBatch, text_BEK: torch.Tensor) -> dict[str, torch.Tensor]:
        """A packed training batch -> flat normalised embeddings for the loss.

        Returns image_emb and text_emb [B*E, D], valid [B*E] (padding slots False; their text
        embeddings are zeros and their text is never encoded), logit_scale and logit_bias.
        """
        img_BED, valid_BE = self._image(images, normalize=True)
        D = img_BED.shape[-1]
        valid = valid_BE.flatten()
        ids_SK = text_BEK.flatten(0, 1)[valid]
        txt = img_BED.new_zeros(valid.shape[0], D)
        txt = txt.index_copy(0, valid.nonzero().squeeze(1), self._text(ids_SK, normalize=True).to(txt.dtype))
        out = {
            "image_emb": img_BED.reshape(-1, D),
            "text_emb": txt,
            "valid": valid,
            "logit_scale": self.logit_scale,
        }
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out
