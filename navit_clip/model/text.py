"""CLIP-style text transformer: causal pre-LN blocks, pooled at the end-of-text token or by attention;
or SigLIP's: bidirectional over the whole padded context, pooled at its last (or first) position.

torch only: this file is also shipped inside an export folder (as navit_text.py).

Shape legend: N texts, K context length, T tokens of the packed layout (the real tokens of all N texts,
then filler up to a multiple of layers.TOKEN_MULTIPLE), D width, H heads, d head width.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# Shipped inside an export folder (navit-clip export --with-text), next to navit_layers.py.
try:
    from navit_clip.model import layers
except ImportError:
    import navit_layers as layers


POOLS = ("eot", "argmax", "eos", "map", "last", "first")
ENDS = ("eot", "argmax", "eos")  # pooled at the caption's end, each finding it its own way (caption_ends)


@dataclass
class TextConfig:
    vocab_size: int = 49408  # embedding rows; the tokenizer's `num_embeddings`
    pad_id: int = 0  # the tokenizer's padding id (right padding)
    eos_id: int = -1  # the end-of-text id that pool=eos reads (-1: none)
    context_length: int = 32
    width: int = 512
    depth: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    pool: str = "eot"  # eot: the last non-padding token (causal: it has seen the whole text) | map
    #                    | argmax: the largest id (transformers' CLIP with its legacy eos_token_id 2)
    #                    | eos: the first eos_id (transformers' CLIP: its tokenizer may pad with eos)
    #                    | last / first: the context's last / first position (SigLIP's, with causal=false)
    ln_eps: float = 1e-5
    act: str = "gelu"  # gelu | quick_gelu (OpenAI's CLIP weights) | gelu_tanh (SigLIP2's)
    # false: every position attends to the whole context, padding included (SigLIP's text towers, open_clip's
    # no_causal_mask): captions are then computed at the full context_length, padded with pad_id
    causal: bool = True
    # Locking (open_clip's --lock-text): groups [token and position embeddings], each block but the
    # last, [last block, final norm, pooling probe], and the text projection; the last
    # lock_unlocked_groups of them stay trainable; lock_norms=false keeps every LayerNorm trainable.
    lock: bool = False
    lock_unlocked_groups: int = 0
    lock_norms: bool = True

    def validate(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"text.width={self.width} is not divisible by text.heads={self.heads}")
        if self.pool not in POOLS:
            raise ValueError(f"text.pool={self.pool!r} must be one of {POOLS}")
        if self.pool in ("last", "first") and self.causal:
            raise ValueError(
                f"model.text.pool={self.pool} reads a fixed position of the padded context: it needs "
                "model.text.causal=false (SigLIP's text tower)"
            )
        if self.pool in ("argmax", "eos") and not self.causal:
            raise ValueError(f"model.text.pool={self.pool} needs model.text.causal=true (CLIP's text tower)")
        if self.pool == "eos" and self.eos_id < 0:
            raise ValueError("model.text.pool=eos needs model.text.eos_id, the tokenizer's end-of-text id")
        if self.act not in layers.ACTIVATIONS:
            raise ValueError(f"model.text.act={self.act!r} is not one of {tuple(layers.ACTIVATIONS)}")
        if self.lock_unlocked_groups < 0:
            raise ValueError(f"model.text.lock_unlocked_groups={self.lock_unlocked_groups} must be >= 0")


Rows = slice | torch.Tensor | None  # which tokens a block computes the outputs of (None: all)


class CausalBlock(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = layers.Mlp(cfg.width, int(cfg.width * cfg.mlp_ratio), bias=True, act=cfg.act)

    checkpointing = False  # recompute activations in backward (set by distributed.parallelize)

    def forward(self, x: torch.Tensor, attend: layers.Attend, rows: Rows = None) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, attend, rows, use_reentrant=False)
        return self._forward(x, attend, rows)

    def _forward(self, x: torch.Tensor, attend: layers.Attend, rows: Rows = None) -> torch.Tensor:
        """x: [..., D] tokens ([T, D] packed or [N, K, D] padded); `attend` is causal per caption.
        `rows` (a slice or an index of the token axis) computes only those tokens' outputs, their
        queries given to `attend` with every token's keys and values: the last block of a tower read at
        one position (or at each caption's end) needs no other row, and the keys and values are all the
        work left for the others. The same numbers as the full block's output at those rows."""
        h = self.norm1(x)
        q_in, x = (h, x) if rows is None else (h[..., rows, :], x[..., rows, :])
        q, k, v = (t.unflatten(-1, (self.heads, -1)) for t in layers.split_linear(self.qkv, (q_in, h, h), 3))
        x = x + self.proj(attend(q, k, v).flatten(-2))
        return x + self.mlp(self.norm2(x))


def caption_lengths(ids_NK: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Tokens up to and including each caption's last non-padding one (at least 1) [N].

    Not a count of non-padding ids: a real token may share the padding id (open_clip's BPE pads with
    0, which is also the token for "!" before a symbol, as in "!$"), and right padding only ever ends
    a caption. An all-padding row keeps its first token, as the padded path pools it.
    """
    position_K = torch.arange(1, ids_NK.shape[1] + 1, device=ids_NK.device)
    return ((ids_NK != pad_id) * position_K).amax(1).clamp(min=1)


def caption_ends(ids_NK: torch.Tensor, cfg: TextConfig) -> torch.Tensor:
    """Tokens up to and including the position each caption is pooled at [N] (pool=eot, argmax, eos;
    `caption_lengths` otherwise): argmax and eos as transformers' CLIPTextModel finds the end of text
    (the first largest id; the first eos_id, position 0 where there is none), so a tokenizer that pads
    with its end-of-text id (openai's CLIP tokenizer) pools where transformers does."""
    if cfg.pool == "argmax":
        return ids_NK.argmax(1) + 1
    if cfg.pool == "eos":
        return (ids_NK == cfg.eos_id).int().argmax(1) + 1
    return caption_lengths(ids_NK, cfg.pad_id)


def _padded_attention(q_NKHd, k_NKHd, v_NKHd, causal: bool) -> torch.Tensor:
    o_NHKd = layers.sdpa(
        q_NKHd.transpose(1, 2), k_NKHd.transpose(1, 2), v_NKHd.transpose(1, 2), is_causal=causal
    )
    return o_NHKd.transpose(1, 2)


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

    def lock_groups(self) -> list[list[nn.Parameter]]:
        """The tower's parameters in open_clip's lock groups, first to last (see TextConfig.lock)."""
        blocks = [list(b.parameters()) for b in self.blocks]
        last = [*blocks.pop(), *self.norm.parameters(), *([self.probe] if self.probe is not None else [])]
        return [[*self.token_embed.parameters(), self.pos_embed], *blocks, last]

    def forward(self, ids_NK: torch.Tensor) -> torch.Tensor:
        """Causal: packed, only real tokens are computed. The captions' tokens are concatenated (shortest
        captions first, equal lengths adjacent) and attend causally within their own caption, so the
        cost follows the tokens, not N x K. Equal to `forward_padded` within float rounding.
        Bidirectional (causal=false): `forward_padded`, every caption at the full context."""
        if not self.cfg.causal:
            return self.forward_padded(ids_NK)
        N, K = ids_NK.shape
        starts_N = torch.arange(N, device=ids_NK.device) * K
        captions = layers.by_length(starts_N, caption_ends(ids_NK, self.cfg), multiple=layers.TOKEN_MULTIPLE)
        x_TD = self.token_embed(ids_NK.flatten()[captions.index]) + self.pos_embed[captions.position]
        attend = partial(layers.grouped_attention, groups=captions.groups, causal=True)
        at_eot = self.probe is None and len(self.blocks) > 0
        for block in self.blocks[:-1] if at_eot else self.blocks:
            x_TD = block(x_TD, attend)
        if at_eot:  # pooled at the end of text: the last block computes those rows alone (see CausalBlock)
            real = captions.groups if captions.real == len(captions.index) else captions.groups[:-1]
            last = partial(layers.last_token_attention, groups=real)
            pooled = self.norm(self.blocks[-1](x_TD, last, torch.cumsum(captions.lengths, 0) - 1))
        else:  # single-head attention pooling over each caption's tokens
            x_TD = self.norm(x_TD)
            caption_T = torch.repeat_interleave(torch.arange(N, device=ids_NK.device), captions.lengths)
            caption_T = F.pad(caption_T, (0, len(captions.index) - captions.real), value=N)  # filler: dropped
            scores_T1 = (x_TD @ self.probe)[:, None] / x_TD.shape[-1] ** 0.5
            pooled = layers.segment_softmax_pool(scores_T1, x_TD[:, None], caption_T, N)[:, 0]
        return pooled[torch.argsort(captions.order)]

    def forward_padded(self, ids_NK: torch.Tensor) -> torch.Tensor:
        """Every caption computed at the full K tokens (static shapes, no host sync: for tracing and
        as the reference the packed `forward` is tested against). A bidirectional tower pads the ids
        back to its context_length first (the data pipeline trims columns that are padding in every
        row): its padding is attended to, so the full context is what it was trained on."""
        if not self.cfg.causal:
            ids_NK = F.pad(ids_NK, (0, self.cfg.context_length - ids_NK.shape[1]), value=self.cfg.pad_id)
        N, K = ids_NK.shape
        x_NKD = self.token_embed(ids_NK) + self.pos_embed[:K]
        attend = partial(_padded_attention, causal=self.cfg.causal)
        # pooled at a fixed position, the last block computes that position's output alone
        read = {"last": slice(-1, None), "first": slice(0, 1)}.get(self.cfg.pool)
        for i, block in enumerate(self.blocks):
            x_NKD = block(x_NKD, attend, read if i == len(self.blocks) - 1 else None)
        x_NKD = self.norm(x_NKD)
        if read is not None:
            return x_NKD[:, 0]
        len_N = caption_ends(ids_NK, self.cfg)
        if self.probe is None:
            return x_NKD[torch.arange(N, device=ids_NK.device), len_N - 1]
        real_NK = torch.arange(K, device=ids_NK.device) < len_N[:, None]
        scores_NK = (x_NKD @ self.probe).masked_fill(~real_NK, float("-inf")) / x_NKD.shape[-1] ** 0.5
        return torch.einsum("nk,nkd->nd", torch.softmax(scores_NK, dim=-1), x_NKD)
