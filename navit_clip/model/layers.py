"""The NaViT layers: pre-LN blocks, MAP pooling, masked mean pooling. torch only.

This file is also shipped, as is, inside an exported encoder (navit-clip export), so it imports
nothing but torch. Attention is passed in as `attend(q, k, v) -> o` ([B, L, H, d] each), so the
same blocks run over any attention backend: block-diagonal over packed sequences in training, a
segment mask in the exported encoder. `cfg` is any object with the VisionConfig attributes.

Shape legend: B sequences, L tokens, E slots, D width, H heads, d head width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class SelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=cfg.bias)
        self.proj = nn.Linear(cfg.width, cfg.width, bias=cfg.bias)
        d = cfg.width // cfg.heads
        self.q_norm = nn.LayerNorm(d, eps=cfg.ln_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(d, eps=cfg.ln_eps) if cfg.qk_norm else nn.Identity()

    def forward(self, x_BLD: torch.Tensor, attend: Attend) -> torch.Tensor:
        B, L, D = x_BLD.shape
        q_BLHd, k_BLHd, v_BLHd = self.qkv(x_BLD).view(B, L, 3, self.heads, D // self.heads).unbind(2)
        o_BLHd = attend(self.q_norm(q_BLHd), self.k_norm(k_BLHd), v_BLHd)
        return self.proj(o_BLHd.reshape(B, L, D))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, bias: bool):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, width, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.attn = SelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = Mlp(cfg.width, int(cfg.width * cfg.mlp_ratio), cfg.bias)

    def forward(self, x_BLD: torch.Tensor, attend: Attend) -> torch.Tensor:
        x_BLD = x_BLD + self.attn(self.norm1(x_BLD), attend)
        return x_BLD + self.mlp(self.norm2(x_BLD))


class MAPHead(nn.Module):
    """Multihead attention pooling: one learned query per image attends over that image's tokens.

    The query must be *selective from the first step*. With a probe and query projection both
    initialised at std 0.02, the attention logits start near 1e-3: the head is a uniform mean, the
    gradient that would sharpen it is ~1e-4, and mean pooling learns shape far more slowly than a class
    token (bench/NOTES.md: "pooling"). So the probe starts at unit scale, like a LayerNormed token, and
    q and k are LayerNormed per head (qk-norm, as in the blocks): logits are O(1) at init and stay
    bounded, which also keeps the softmax from saturating onto one token late in training.
    """

    def __init__(self, cfg):
        super().__init__()
        D = cfg.width
        self.heads = cfg.heads
        self.probe = nn.Parameter(torch.randn(D))
        self.q = nn.Linear(D, D, bias=cfg.bias)
        self.kv = nn.Linear(D, 2 * D, bias=cfg.bias)
        self.proj = nn.Linear(D, D, bias=cfg.bias)
        d = D // cfg.heads
        self.q_norm = nn.LayerNorm(d, eps=cfg.ln_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(d, eps=cfg.ln_eps) if cfg.qk_norm else nn.Identity()
        self.norm = nn.LayerNorm(D, eps=cfg.ln_eps)
        self.mlp = Mlp(D, int(D * cfg.mlp_ratio), cfg.bias)

    def forward(
        self, x_BLD: torch.Tensor, member_BEL: torch.Tensor, slot_valid_BE: torch.Tensor
    ) -> torch.Tensor:
        B, L, D = x_BLD.shape
        E, H = member_BEL.shape[1], self.heads
        q_1H1d = self.q_norm(self.q(self.probe).view(1, H, 1, D // H))
        q_BHEd = q_1H1d.expand(B, H, E, D // H)
        k_BLHd, v_BLHd = self.kv(x_BLD).view(B, L, 2, H, D // H).unbind(2)
        # An empty slot would have an all-False row (NaN softmax): let it see everything, zero it below.
        mask_B1EL = (member_BEL | ~slot_valid_BE[:, :, None])[:, None]
        o_BHEd = F.scaled_dot_product_attention(
            q_BHEd.to(v_BLHd.dtype),
            self.k_norm(k_BLHd).transpose(1, 2).to(v_BLHd.dtype),
            v_BLHd.transpose(1, 2),
            attn_mask=mask_B1EL,
        )
        y_BED = self.proj(o_BHEd.transpose(1, 2).reshape(B, E, D))
        y_BED = y_BED + self.mlp(self.norm(y_BED))
        return y_BED * slot_valid_BE[:, :, None]


def mean_pool(x_BLD: torch.Tensor, member_BEL: torch.Tensor) -> torch.Tensor:
    """Masked mean over each slot's tokens: [B, E, D] (zero for empty slots)."""
    weight_BEL = member_BEL.to(x_BLD.dtype)
    weight_BEL = weight_BEL / weight_BEL.sum(-1, keepdim=True).clamp(min=1)
    return torch.bmm(weight_BEL, x_BLD)


def build_tower(module: nn.Module, cfg, posemb: nn.Module) -> None:
    """Attach the NaViT modules to `module`. The training model and the exported encoder both build
    themselves here, so their parameter names (and checkpoints) always match."""
    P = cfg.patch_size
    module.patch_embed = nn.Linear(P * P * 3, cfg.width, bias=cfg.bias)
    module.posemb = posemb
    # open_clip's ln_pre: without it the first block sees raw patch projections whose scale follows the
    # pixels (flat white patches give large, identical vectors) and the position signal is swamped.
    module.ln_pre = (
        nn.LayerNorm(cfg.width, eps=cfg.ln_eps) if getattr(cfg, "ln_pre", False) else nn.Identity()
    )
    module.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
    module.norm = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
    module.head = MAPHead(cfg) if cfg.pool == "map" else None


def embed_tokens(
    tower: nn.Module, patches_BLC: torch.Tensor, coords_BL2: torch.Tensor, grid_BL2: torch.Tensor
) -> torch.Tensor:
    """Patch projection + position embedding (+ ln_pre): the tower's input tokens [B, L, D]."""
    x_BLD = tower.patch_embed(patches_BLC) + tower.posemb(coords_BL2, grid_BL2).to(patches_BLC.dtype)
    return tower.ln_pre(x_BLD)


def init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
