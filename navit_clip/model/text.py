"""CLIP-style text transformer: causal pre-LN blocks, pooled at the end-of-text token or by attention.

torch only: this file is also shipped inside an export folder (as navit_text.py).

Shape legend: N texts, K context length, D width, H heads, d head width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

try:
    from navit_clip.model.layers import Mlp
except (
    ImportError
):  # shipped inside an export folder (navit-clip export --with-text), next to navit_layers.py
    from navit_layers import Mlp


@dataclass
class TextConfig:
    vocab_size: int = 49408  # embedding rows; the tokenizer's `num_embeddings`
    pad_id: int = 0  # the tokenizer's padding id (right padding)
    context_length: int = 32
    width: int = 512
    depth: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    pool: str = "eot"  # eot: the last non-padding token (causal: it has seen the whole text) | map
    ln_eps: float = 1e-5

    def validate(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"text.width={self.width} is not divisible by text.heads={self.heads}")
        if self.pool not in ("eot", "map"):
            raise ValueError(f"text.pool={self.pool!r} must be 'eot' or 'map'")


class CausalBlock(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = Mlp(cfg.width, int(cfg.width * cfg.mlp_ratio), bias=True)

    checkpointing = False  # recompute activations in backward (set by distributed.parallelize)

    def forward(self, x_NKD: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x_NKD, use_reentrant=False)
        return self._forward(x_NKD)

    def _forward(self, x_NKD: torch.Tensor) -> torch.Tensor:
        N, K, D = x_NKD.shape
        q, k, v = (
            self.qkv(self.norm1(x_NKD)).view(N, K, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        )
        o_NHKd = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x_NKD = x_NKD + self.proj(o_NHKd.transpose(1, 2).reshape(N, K, D))
        return x_NKD + self.mlp(self.norm2(x_NKD))


class TextTransformer(nn.Module):
    """forward(ids [N, K] right-padded with pad_id) -> pooled features [N, D]."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.randn(cfg.context_length, cfg.width) * 0.01)
        self.blocks = nn.ModuleList([CausalBlock(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.probe = nn.Parameter(torch.randn(cfg.width) * 0.02) if cfg.pool == "map" else None
        self.init_weights()

    def init_weights(self) -> None:
        """open_clip's text-tower init (CLIP's): attention at width^-0.5, residual outputs scaled down
        by sqrt(2 * depth), biases zero. PyTorch's default Linear init instead left navit-clip's
        zero-shot top-1 at 30.6 % where this gives 44.8 % in the same 180 s race (bench/NOTES.md)."""
        D = self.cfg.width
        proj_std = D**-0.5 * (2 * self.cfg.depth) ** -0.5
        nn.init.normal_(self.token_embed.weight, std=0.02)
        for block in self.blocks:
            for layer, std in (
                (block.qkv, D**-0.5),
                (block.proj, proj_std),
                (block.mlp.fc1, (2 * D) ** -0.5),
                (block.mlp.fc2, proj_std),
            ):
                nn.init.normal_(layer.weight, std=std)
                nn.init.zeros_(layer.bias)

    def forward(self, ids_NK: torch.Tensor) -> torch.Tensor:
        N, K = ids_NK.shape
        x_NKD = self.token_embed(ids_NK) + self.pos_embed[:K]
        for block in self.blocks:
            x_NKD = block(x_NKD)
        x_NKD = self.norm(x_NKD)
        real_NK = ids_NK != self.cfg.pad_id
        if self.probe is None:
            last_N = (real_NK.sum(1) - 1).clamp(min=0)
            return x_NKD[torch.arange(N, device=ids_NK.device), last_N]
        # single-head attention pooling over the real tokens
        scores_NK = (x_NKD @ self.probe).masked_fill(~real_NK, float("-inf")) / x_NKD.shape[-1] ** 0.5
        weights_NK = torch.softmax(scores_NK, dim=-1).nan_to_num(0.0)
        return torch.einsum("nk,nkd->nd", weights_NK, x_NKD)
