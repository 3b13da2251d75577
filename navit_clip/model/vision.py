"""NaViT: a pre-LN ViT over packed sequences of patches from images of any size and aspect ratio.

Shape legend:
    B sequences, L tokens per sequence, E image slots per sequence (E_max), D width,
    H heads, d head width (D / H), C values per patch (P * P * 3), N images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial

import torch
from torch import nn

from navit_clip.model.attention import AttentionPlan, block_attention
from navit_clip.model.layers import build_tower, embed_tokens, init_weights, mean_pool, slot_index
from navit_clip.model.posemb import POSEMB_KINDS, ROPE_MODES, FactorizedPosEmb, rope2d_positions, with_rope2d
from navit_clip.packing import PackedBatch, grid_size, pack_images, unpack_slots


@dataclass
class VisionConfig:
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    qk_norm: bool = True
    bias: bool = False  # the paper drops biases from dense layers
    posemb: str = (
        "rope2d"  # rope2d | learned | fractional | sinusoidal | fourier | rope2d+TABLE (model/posemb.py)
    )
    max_grid: int = 64  # rows of the learned position tables (patches per side)
    # rope2d positions (model/posemb.py:rope2d_positions). cap: patch steps for images up to rope_span
    # patches long, longer ones shrunk to span it; span: every image's longer side spans rope_span.
    # 0: patch indices. A training config that omits rope_span gets its data's longest side (config.py).
    rope_span: float = 16.0
    rope_mode: str = "cap"
    pool: str = "map"  # map | mean
    attn_backend: str = "auto"  # dense | grouped | flex | varlen | auto
    ln_eps: float = 1e-6
    ln_pre: bool = False  # LayerNorm on the input tokens, before the first block (open_clip's ln_pre)

    def validate(self) -> None:
        for name in ("patch_size", "width", "depth", "heads", "max_grid"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.vision.{name}={getattr(self, name)} must be positive")
        if self.width % self.heads:
            raise ValueError(f"vision.width={self.width} is not divisible by vision.heads={self.heads}")
        if self.pool not in ("map", "mean"):
            raise ValueError(f"vision.pool={self.pool!r} must be 'map' or 'mean'")
        if self.rope_span < 0:
            raise ValueError(
                f"model.vision.rope_span={self.rope_span} must be >= 0 (0: positions in patches)"
            )
        if self.rope_mode not in ROPE_MODES:
            raise ValueError(f"model.vision.rope_mode={self.rope_mode!r} is not one of {ROPE_MODES}")
        if self.posemb not in POSEMB_KINDS:
            raise ValueError(f"model.vision.posemb={self.posemb!r} is not one of {POSEMB_KINDS}")
        if self.posemb.startswith("rope2d") and (self.width // self.heads) % 4:
            raise ValueError(
                f"vision.posemb=rope2d needs a head width (width / heads = {self.width // self.heads}) "
                "divisible by 4"
            )


@dataclass
class VisionOutput:
    pooled: torch.Tensor  # [B, E, D] one embedding per slot (invalid slots are zero)
    slot_valid: torch.Tensor  # [B, E] bool
    lay_out: Callable[[], torch.Tensor] = field(repr=False)  # -> `tokens`

    @cached_property
    def tokens(self) -> torch.Tensor:
        """[B, L, D] final-normed per-token features (padding rows are meaningless). Laid out on first
        read: a flat backend's tokens are scattered back to [B, L] only for a caller that reads
        them (a VLM's encoder), not in every training step, which reads `pooled` alone."""
        return self.lay_out()


class NaViT(nn.Module):
    """Packed NaViT image tower.

    forward(batch: PackedBatch) -> VisionOutput with per-token features [B, L, D] and per-slot pooled
    embeddings [B, E, D]. `encode_images(list of [3, H, W])` -> [N, D] packs internally.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        build_tower(self, cfg, FactorizedPosEmb(cfg.posemb, cfg.width, cfg.max_grid))
        init_weights(self)

    def forward(self, batch: PackedBatch) -> VisionOutput:
        seg_BL = batch.segment_ids
        B, E = batch.slot_valid.shape
        plan = AttentionPlan.build(seg_BL, self.cfg.attn_backend)
        patches, coords, grid = batch.patches, batch.coords, batch.grid
        if plan.flat:  # the backend runs on real tokens only: padding costs no compute at all
            patches, coords, grid = plan.to_flat(patches), plan.to_flat(coords), plan.to_flat(grid)
        else:  # padding patches are zeroed: NaN there would reach real tokens as 0 x NaN in attention
            patches = patches.masked_fill(seg_BL.unsqueeze(-1) == 0, 0.0)
        x = embed_tokens(self, patches, coords, grid)
        attend = partial(block_attention, plan=plan)
        if self.posemb.rope:
            pos = rope2d_positions(coords, grid, self.cfg.rope_span, self.cfg.rope_mode)
            attend = with_rope2d(attend, pos, self.cfg.width // self.cfg.heads)
        for block in self.blocks:
            x = block(x, attend)
        x = self.norm(x)
        slot_BL = slot_index(seg_BL, E)
        slot_N = plan.to_flat(slot_BL)[0] if plan.flat else slot_BL.flatten()
        if plan.flat:
            slot_N[plan.real :] = B * E  # filler pools into the spare row, dropped like padding
        x_ND = x.flatten(0, 1)  # a view either way ([1, T, D] flat): its backward copies nothing
        if self.head is not None:
            pooled = self.head(x_ND, slot_N, batch.slot_valid.flatten())
        else:
            pooled = mean_pool(x_ND, slot_N, B * E)
        pooled_BED = pooled.view(B, E, -1)
        lay_out = partial(plan.from_flat, x) if plan.flat else lambda: x
        return VisionOutput(pooled=pooled_BED, slot_valid=batch.slot_valid, lay_out=lay_out)

    def encode_images(
        self, images: Sequence[torch.Tensor], seq_len: int = 256, max_images: int = 8
    ) -> torch.Tensor:
        """Encode a list of [3, H, W] images of any sizes -> pooled embeddings [N, D] in input order.

        Images are patchified (sides rounded to the nearest patch multiple) and packed first-fit into
        sequences of `seq_len` tokens (raised to the largest image if needed), at most `max_images` to
        a sequence. The layout does not change the embeddings (packing invariance), only the cost.
        """
        P = self.cfg.patch_size
        device = next(self.parameters()).device
        largest = max(h * w for h, w in (grid_size(im.shape[-2], im.shape[-1], P) for im in images))
        batch = pack_images([im.to(torch.float32) for im in images], P, max(seq_len, largest), max_images).to(
            device
        )
        batch.patches = batch.patches.to(next(self.parameters()).dtype)
        return unpack_slots(self(batch).pooled, batch, len(images))
