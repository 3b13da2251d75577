"""NaViT: a pre-LN ViT over packed sequences of patches from images of any size and aspect ratio.

Shape legend:
    B sequences, L tokens per sequence, E image slots per sequence (E_max), D width,
    H heads, d head width (D / H), C values per patch (P * P * 3), N images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from navit_clip.model.attention import AttentionPlan, block_attention
from navit_clip.model.posemb import FactorizedPosEmb
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
    posemb: str = "learned"  # learned | fractional | sinusoidal | fourier
    max_grid: int = 64  # rows of the learned position tables (patches per side)
    pool: str = "map"  # map | mean
    attn_backend: str = "auto"  # dense | grouped | flex | varlen | auto
    seq_len: int = 256  # L, tokens per packed sequence
    max_images: int = 8  # E_max, image slots per sequence
    ln_eps: float = 1e-6

    def validate(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"vision.width={self.width} is not divisible by vision.heads={self.heads}")
        if self.pool not in ("map", "mean"):
            raise ValueError(f"vision.pool={self.pool!r} must be 'map' or 'mean'")
        if self.patch_size < 1 or self.seq_len < 1 or self.max_images < 1:
            raise ValueError("vision.patch_size, vision.seq_len and vision.max_images must be positive")


@dataclass
class VisionOutput:
    tokens: torch.Tensor  # [B, L, D] final-normed per-token features (padding rows are meaningless)
    pooled: torch.Tensor  # [B, E, D] one embedding per slot (invalid slots are zero)
    slot_valid: torch.Tensor  # [B, E] bool


class SelfAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=cfg.bias)
        self.proj = nn.Linear(cfg.width, cfg.width, bias=cfg.bias)
        d = cfg.width // cfg.heads
        self.q_norm = nn.LayerNorm(d, eps=cfg.ln_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(d, eps=cfg.ln_eps) if cfg.qk_norm else nn.Identity()

    def forward(self, x_BLD: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        B, L, D = x_BLD.shape
        q_BLHd, k_BLHd, v_BLHd = self.qkv(x_BLD).view(B, L, 3, self.heads, D // self.heads).unbind(2)
        o_BLHd = block_attention(self.q_norm(q_BLHd), self.k_norm(k_BLHd), v_BLHd, plan)
        return self.proj(o_BLHd.reshape(B, L, D))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, bias: bool):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, width, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.attn = SelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = Mlp(cfg.width, int(cfg.width * cfg.mlp_ratio), cfg.bias)

    def forward(self, x_BLD: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        x_BLD = x_BLD + self.attn(self.norm1(x_BLD), plan)
        return x_BLD + self.mlp(self.norm2(x_BLD))


class MAPHead(nn.Module):
    """Multihead attention pooling: one learned query per image attends over that image's tokens."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        D = cfg.width
        self.heads = cfg.heads
        self.probe = nn.Parameter(torch.randn(D) * 0.02)
        self.q = nn.Linear(D, D, bias=cfg.bias)
        self.kv = nn.Linear(D, 2 * D, bias=cfg.bias)
        self.proj = nn.Linear(D, D, bias=cfg.bias)
        self.norm = nn.LayerNorm(D, eps=cfg.ln_eps)
        self.mlp = Mlp(D, int(D * cfg.mlp_ratio), cfg.bias)

    def forward(
        self, x_BLD: torch.Tensor, member_BEL: torch.Tensor, slot_valid_BE: torch.Tensor
    ) -> torch.Tensor:
        B, L, D = x_BLD.shape
        E, H = member_BEL.shape[1], self.heads
        q_BHEd = self.q(self.probe).view(1, H, 1, D // H).expand(B, H, E, D // H)
        k_BLHd, v_BLHd = self.kv(x_BLD).view(B, L, 2, H, D // H).unbind(2)
        # An empty slot would have an all-False row (NaN softmax): let it see everything, zero it below.
        mask_B1EL = (member_BEL | ~slot_valid_BE[:, :, None])[:, None]
        o_BHEd = F.scaled_dot_product_attention(
            q_BHEd, k_BLHd.transpose(1, 2), v_BLHd.transpose(1, 2), attn_mask=mask_B1EL
        )
        y_BED = self.proj(o_BHEd.transpose(1, 2).reshape(B, E, D))
        y_BED = y_BED + self.mlp(self.norm(y_BED))
        return y_BED * slot_valid_BE[:, :, None]


def mean_pool(x_BLD: torch.Tensor, member_BEL: torch.Tensor) -> torch.Tensor:
    """Masked mean over each slot's tokens: [B, E, D] (zero for empty slots)."""
    weight_BEL = member_BEL.to(x_BLD.dtype)
    weight_BEL = weight_BEL / weight_BEL.sum(-1, keepdim=True).clamp(min=1)
    return torch.bmm(weight_BEL, x_BLD)


class NaViT(nn.Module):
    """Packed NaViT image tower.

    forward(batch: PackedBatch) -> VisionOutput with per-token features [B, L, D] and per-slot pooled
    embeddings [B, E, D]. `encode_images(list of [3, H, W])` -> [N, D] packs internally.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        P = cfg.patch_size
        self.patch_embed = nn.Linear(P * P * 3, cfg.width, bias=cfg.bias)
        self.posemb = FactorizedPosEmb(cfg.posemb, cfg.width, cfg.max_grid)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.head = MAPHead(cfg) if cfg.pool == "map" else None
        self.apply(_init_weights)

    def forward(self, batch: PackedBatch) -> VisionOutput:
        seg_BL = batch.segment_ids
        E = batch.slot_valid.shape[1]
        plan = AttentionPlan.build(seg_BL, self.cfg.attn_backend)
        patches, coords, grid = batch.patches, batch.coords, batch.grid
        if plan.flat:  # the backend runs on real tokens only: padding costs no compute at all
            patches, coords, grid = plan.to_flat(patches), plan.to_flat(coords), plan.to_flat(grid)
        x = self.patch_embed(patches) + self.posemb(coords, grid).to(patches.dtype)
        for block in self.blocks:
            x = block(x, plan)
        x = self.norm(x)
        x_BLD = plan.from_flat(x) if plan.flat else x
        slot_ids = torch.arange(1, E + 1, device=seg_BL.device)
        member_BEL = seg_BL[:, None, :] == slot_ids[None, :, None]
        if self.head is not None:
            pooled_BED = self.head(x_BLD, member_BEL, batch.slot_valid)
        else:
            pooled_BED = mean_pool(x_BLD, member_BEL)
        return VisionOutput(tokens=x_BLD, pooled=pooled_BED, slot_valid=batch.slot_valid)

    def encode_images(
        self, images: Sequence[torch.Tensor], seq_len: int | None = None, max_images: int | None = None
    ) -> torch.Tensor:
        """Encode a list of [3, H, W] images of any sizes -> pooled embeddings [N, D] in input order.

        Images are patchified (sides rounded to the nearest patch multiple) and packed first-fit into
        sequences of `seq_len` tokens (default: the config's, raised to the largest image if needed).
        """
        P = self.cfg.patch_size
        device = next(self.parameters()).device
        seq_len = seq_len or self.cfg.seq_len
        largest = max(h * w for h, w in (grid_size(im.shape[-2], im.shape[-1], P) for im in images))
        batch = pack_images(
            [im.to(torch.float32) for im in images],
            P,
            max(seq_len, largest),
            max_images or self.cfg.max_images,
        ).to(device)
        batch.patches = batch.patches.to(next(self.parameters()).dtype)
        return unpack_slots(self(batch).pooled, batch, len(images))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
