"""The NaViT layers: pre-LN blocks, MAP pooling, masked mean pooling. torch only.

This file is also shipped, as is, inside an exported encoder (navit-clip export), so it imports
nothing but torch. Attention is passed in as `attend(q, k, v) -> o` ([B, L, H, d] each), so the
same blocks run over any attention backend: block-diagonal over packed sequences in training, a
segment mask in the exported encoder. `cfg` is any object with the VisionConfig attributes.

Shape legend: B sequences, L tokens, E slots, D width, H heads, d head width.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

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
        q_BLHd, k_BLHd, v_BLHd = (
            t.view(B, L, self.heads, D // self.heads) for t in split_linear(self.qkv, x_BLD, 3)
        )
        o_BLHd = attend(self.q_norm(q_BLHd), self.k_norm(k_BLHd), v_BLHd)
        return self.proj(o_BLHd.reshape(B, L, D))


def split_linear(
    layer: nn.Linear, x: torch.Tensor | tuple[torch.Tensor, ...], parts: int
) -> tuple[torch.Tensor, ...]:
    """`layer(x)` cut into `parts` equal slices of its output features (q, k, v), each its own
    product, so each comes out contiguous. Slicing one fused product instead leaves strided views
    that LayerNorm (qk-norm) and attention copy, forward and backward: the split is 4 % faster on a
    ViT-Ti training step on CPU (bench/NOTES.md), with the same parameters and the same FLOPs.
    `x` may be a tuple, one input per part (queries of fewer rows than the keys and values)."""
    biases = layer.bias.chunk(parts) if layer.bias is not None else (None,) * parts
    inputs = x if isinstance(x, tuple) else (x,) * parts
    return tuple(F.linear(t, w, b) for t, w, b in zip(inputs, layer.weight.chunk(parts), biases))


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP weights were trained with (open_clip's
    QuickGELU, its `-quickgelu` models and the `openai` checkpoints)."""
    return x * torch.sigmoid(1.702 * x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation: what SigLIP2's towers (timm's `gelu_tanh`, open_clip's
    act_kwargs approximate=tanh) were trained with."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu, "gelu_tanh": gelu_tanh}


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, bias: bool, act: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, width, bias=bias)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.attn = SelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = Mlp(cfg.width, int(cfg.width * cfg.mlp_ratio), cfg.bias, getattr(cfg, "act", "gelu"))

    checkpointing = False  # recompute activations in backward (set by distributed.parallelize)

    def forward(self, x_BLD: torch.Tensor, attend: Attend) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x_BLD, attend, use_reentrant=False)
        return self._forward(x_BLD, attend)

    def _forward(self, x_BLD: torch.Tensor, attend: Attend) -> torch.Tensor:
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
        self.mlp = Mlp(D, int(D * cfg.mlp_ratio), cfg.bias, getattr(cfg, "act", "gelu"))

    def forward(self, x_ND: torch.Tensor, slot_N: torch.Tensor, valid_S: torch.Tensor) -> torch.Tensor:
        """Tokens [N, D], each token's slot row [N] (see `slot_index`), valid slots [S] -> [S, D].

        The query is one learned probe shared by every slot, so each slot's attention is a softmax
        over its own tokens' scores: computed per token and summed per slot, O(N) work and memory,
        however many slots a sequence has (no [slots, tokens] mask).
        """
        N, D = x_ND.shape
        H, d = self.heads, D // self.heads
        q_Hd = self.q_norm(self.q(self.probe).view(H, d))
        k_NHd, v_NHd = (t.view(N, H, d) for t in split_linear(self.kv, x_ND, 2))
        scores_NH = (self.k_norm(k_NHd) * q_Hd.to(k_NHd.dtype)).sum(-1) * d**-0.5
        o_SHd = segment_softmax_pool(scores_NH, v_NHd, slot_N, valid_S.shape[0])
        y_SD = self.proj(o_SHd.reshape(-1, D))
        y_SD = y_SD + self.mlp(self.norm(y_SD))
        return y_SD * valid_S[:, None]


# Flat layouts (`by_length`) are padded to a multiple of this many tokens, so that the matmuls of
# a step see a few recurring shapes instead of a new one every step: oneDNN builds a bf16 kernel per
# shape on CPU (~3 ms for a [2000, 192] x [192, 768] product, against 0.3 ms once built; measured),
# and a ViT-Ti step has ~25 such products per tower. At most 63 filler tokens, ~3 % of a 2048-token step.
TOKEN_MULTIPLE = 64


class LengthGroups(NamedTuple):
    """Sequences of a flat buffer reordered shortest first, equal lengths adjacent (see `by_length`)."""

    order: torch.Tensor  # [S] the sequences in that order
    lengths: torch.Tensor  # [S] their lengths, ascending
    index: torch.Tensor  # [T] every token's offset in the buffer, sequence by sequence in `order`
    position: torch.Tensor  # [T] each token's position within its sequence
    groups: list[tuple[int, int]]  # (count, n) per run of equal lengths: `grouped_attention`'s groups
    real: int  # tokens of the sequences; the rest of the layout (T - real) is filler


def by_length(starts_S: torch.Tensor, lengths_S: torch.Tensor, multiple: int = 1) -> LengthGroups:
    """Sequences starting at `starts_S` with `lengths_S` tokens -> one gather index that lays their
    tokens out shortest sequence first (token j of a sequence at start + j). One host sync (groups).

    With `multiple` > 1 the layout ends with filler up to a multiple of it: one more sequence whose
    tokens repeat the first real ones (offset and position), attending only among themselves.
    Nothing reads their outputs, so their gradients are zero and the sequences' results are those of
    the unpadded layout; `real` says where the filler starts."""
    lengths, order = torch.sort(lengths_S, stable=True)
    n_unique, counts = torch.unique_consecutive(lengths, return_counts=True)
    groups = list(zip(counts.tolist(), n_unique.tolist()))
    real = sum(count * n for count, n in groups)
    first_S = torch.cumsum(lengths, 0) - lengths
    position = torch.arange(real, device=lengths.device) - torch.repeat_interleave(first_S, lengths)
    index = torch.repeat_interleave(starts_S[order], lengths) + position
    filler = -real % multiple
    if filler:
        copy = torch.arange(filler, device=lengths.device) % real
        index, position = torch.cat([index, index[copy]]), torch.cat([position, position[copy]])
        groups.append((1, filler))
    return LengthGroups(order, lengths, index, position, groups, real)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """`F.scaled_dot_product_attention`, in float32 on CPU. Under CPU autocast SDPA would run in bf16,
    whose CPU backward is 3-9x slower than float32's at NaViT's per-image sizes (heads of 64, 9-256
    tokens; torch 2.15), while the matmuls around it are what bf16 speeds up. The output keeps
    float32 (the next Linear casts it). Elsewhere (CUDA) SDPA as is: its kernels want half precision."""
    if q.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    with torch.autocast("cpu", enabled=False):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs)


def grouped_attention(
    q_THd: torch.Tensor, k_THd: torch.Tensor, v_THd: torch.Tensor, groups: list[tuple[int, int]], causal: bool
) -> torch.Tensor:
    """Attention within each sequence of a flat layout [T, H, d]: sequences laid out one after the
    other, those of equal length adjacent; `groups` lists (count, n) for each run of `count` sequences
    of `n` tokens, and each run is one batched SDPA call [count, H, n, d] (no mask, no padding; causal
    within each sequence when `causal`). split, not slicing: the backward is one cat, not a
    zero-filled buffer per group."""
    H, d = q_THd.shape[1:]
    sizes = [count * n for count, n in groups]
    outs = []
    for (count, n), q, k, v in zip(groups, q_THd.split(sizes), k_THd.split(sizes), v_THd.split(sizes)):
        q_kHnd, k_kHnd, v_kHnd = (t.view(count, n, H, d).transpose(1, 2) for t in (q, k, v))
        o_kHnd = sdpa(q_kHnd, k_kHnd, v_kHnd, is_causal=causal)
        outs.append(o_kHnd.transpose(1, 2).reshape(count * n, H, d))
    return torch.cat(outs) if outs else q_THd


def last_token_attention(
    q_SHd: torch.Tensor, k_THd: torch.Tensor, v_THd: torch.Tensor, groups: list[tuple[int, int]]
) -> torch.Tensor:
    """`grouped_attention` (causal) for each sequence's last token alone: q_SHd holds one query per
    sequence, in the layout's order, and the last token of a causal sequence sees all of it, so each
    run of equal lengths is one SDPA call [count, H, 1, d] over its keys [count, H, n, d]. Rows of the
    layout past `groups` (`by_length`'s filler) are not read."""
    H, d = k_THd.shape[1:]
    sizes = [count * n for count, n in groups]
    keys, values = (t.split([*sizes, t.shape[0] - sum(sizes)]) for t in (k_THd, v_THd))
    outs = []
    for (count, n), q, k, v in zip(groups, q_SHd.split([count for count, _ in groups]), keys, values):
        k_kHnd, v_kHnd = (t.view(count, n, H, d).transpose(1, 2) for t in (k, v))
        outs.append(sdpa(q[:, :, None], k_kHnd, v_kHnd)[:, :, 0])
    return torch.cat(outs) if outs else q_SHd


def slot_index(segment_ids_BL: torch.Tensor, E: int) -> torch.Tensor:
    """[B, L] segment ids (1..E image slots, 0 padding) -> each token's pooled row [B, L]:
    b * E + segment - 1 for image tokens, and B * E (one spare row, dropped) for padding."""
    B = segment_ids_BL.shape[0]
    first_B1 = torch.arange(B, device=segment_ids_BL.device)[:, None] * E
    return torch.where(segment_ids_BL > 0, first_B1 + segment_ids_BL - 1, B * E)


def segment_softmax_pool(
    scores_NH: torch.Tensor, v_NHd: torch.Tensor, slot_N: torch.Tensor, S: int
) -> torch.Tensor:
    """sum over each slot's tokens of softmax(scores) * v, per head: [S, H, d] (zero for slots with
    no token). Rows at or past S (padding) are computed and dropped. Softmax statistics in float32 (or wider);
    the per-slot max only shifts the exponent, so it carries no gradient."""
    acc = torch.promote_types(scores_NH.dtype, torch.float32)  # float32, or float64 when given
    s_NH = scores_NH.to(acc)
    rows = S + 1  # the slots and the spare padding row
    idx_NH = slot_N[:, None].expand_as(s_NH)
    max_RH = s_NH.new_full((rows, s_NH.shape[1]), float("-inf")).scatter_reduce(
        0, idx_NH, s_NH.detach(), "amax"
    )
    w_NH = torch.exp(s_NH - max_RH[slot_N])
    den_RH = s_NH.new_zeros(rows, s_NH.shape[1]).index_add(0, slot_N, w_NH)
    num_RHd = s_NH.new_zeros(rows, *v_NHd.shape[1:]).index_add(0, slot_N, w_NH[..., None] * v_NHd.to(acc))
    return (num_RHd[:S] / den_RH[:S, :, None].clamp(min=torch.finfo(acc).tiny)).to(v_NHd.dtype)


def mean_pool(x_ND: torch.Tensor, slot_N: torch.Tensor, S: int) -> torch.Tensor:
    """Mean of each slot's tokens: [S, D] (zero for slots with no token); rows past S dropped."""
    sums_RD = x_ND.new_zeros(S + 1, x_ND.shape[1]).index_add(0, slot_N, x_ND)
    counts_R = x_ND.new_zeros(S + 1).index_add(0, slot_N, x_ND.new_ones(slot_N.shape[0]))
    return sums_RD[:S] / counts_R[:S, None].clamp(min=1)


def class_token_layout(segment_ids_BL: torch.Tensor, E: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where tokens go when each image gets a class token just before its patches: sequences of
    L + E tokens. Returns every old token's new position [B, L] and each slot's class-token position
    [B, E] (both within a sequence). Images keep their order and stay contiguous (every attention
    backend, varlen and grouped included, sees runs); padding moves to the end, and the class tokens
    of empty slots land there as padding. Needs images in slot order, slot k's tokens one run with
    segment id k + 1 and padding after them (as `packing.build_packed_batch` lays them out)."""
    B, L = segment_ids_BL.shape
    seg_BL = segment_ids_BL
    n_valid_B1 = seg_BL.amax(1, keepdim=True)  # images in the sequence (slots 1..n used)
    dest_BL = torch.arange(L, device=seg_BL.device) + torch.where(seg_BL > 0, seg_BL, n_valid_B1)
    counts_BE = seg_BL.new_zeros(B, E + 1).scatter_add_(1, seg_BL, torch.ones_like(seg_BL))[:, 1:]
    slot_E = torch.arange(E, device=seg_BL.device)
    cls_BE = torch.cumsum(counts_BE, 1) - counts_BE + slot_E  # image start, after the earlier class tokens
    cls_BE = torch.where(slot_E < n_valid_B1, cls_BE, L + slot_E)  # empty slots: at the end, as padding
    return dest_BL, cls_BE


PROJECTIONS = ("linear", "linear_bias", "none")


def projection(kind: str, width: int, embed_dim: int) -> nn.Module:
    """A tower's projection into the shared embedding space: linear (CLIP's, no bias), linear_bias
    (SigLIP's text projection), or none (SigLIP's image towers: the pooled feature is the embedding)."""
    if kind not in PROJECTIONS:
        raise ValueError(f"projection {kind!r} is not one of {PROJECTIONS}")
    if kind == "none":
        if width != embed_dim:
            raise ValueError(f"a tower of width {width} has no projection, so embed_dim must be {width}")
        return nn.Identity()
    return nn.Linear(width, embed_dim, bias=kind == "linear_bias")


def build_tower(module: nn.Module, cfg, posemb: nn.Module) -> None:
    """Attach the NaViT modules to `module`. The training model and the exported encoder both build
    themselves here, so their parameter names (and checkpoints) always match."""
    P = cfg.patch_size
    cls_token = getattr(cfg, "cls_token", False)
    # With a class token the patch projection has no bias, as in CLIP's ViT (open_clip's conv1): a bias
    # there adds one vector to every patch token, what the position table already can. patch_bias
    # states it where a checkpoint decides (timm's ViTs: a bias unless pre-norm).
    patch_bias = getattr(cfg, "patch_bias", None)
    patch_bias = cfg.bias and not cls_token if patch_bias is None else patch_bias
    module.patch_embed = nn.Linear(P * P * 3, cfg.width, bias=patch_bias)
    module.cls_token = nn.Parameter(torch.randn(cfg.width) * cfg.width**-0.5) if cls_token else None
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
    tower: nn.Module,
    patches_BLC: torch.Tensor,
    coords_BL2: torch.Tensor,
    grid_BL2: torch.Tensor,
    is_cls_BL: torch.Tensor | None = None,
) -> torch.Tensor:
    """Patch projection + position embedding (+ ln_pre): the tower's input tokens [B, L, D]. Tokens
    marked `is_cls_BL` are the class token instead (its own position vector is folded into it)."""
    x_BLD = tower.patch_embed(patches_BLC)
    if tower.posemb.kind != "none":  # plain rope2d adds nothing here (positions enter in attention)
        x_BLD = x_BLD + tower.posemb(coords_BL2, grid_BL2).to(patches_BLC.dtype)
    if is_cls_BL is not None:
        x_BLD = torch.where(is_cls_BL[..., None], tower.cls_token.to(x_BLD.dtype), x_BLD)
    return tower.ln_pre(x_BLD)


def init_weights(tower: nn.Module) -> None:
    """The blocks' Linear layers trunc-normal std 0.02 (timm's ViT); the two ends of the tower at
    big_vision's scale: the patch projection lecun-normal (std fan_in^-0.5: unit-scale tokens), the MAP
    head's layers xavier-uniform (its fused k/v as two D x D matrices); biases 0.

    Both ends feed something with no LayerNorm before it: the patch projection the first block (rope
    adds no position vector, ln_pre is off), the head the image projection and the L2 normalisation.
    At std 0.02 the tokens started at std ~0.56 and the pooled output at rms ~0.09 (now 1.0 and 0.56),
    and the warm-up's first Adam steps (each weight moves ~lr whatever its gradient, in a direction
    shared by every image) swamped them: both towers' embeddings collapsed onto one direction (mean
    pairwise cosine 0.99) and the loss sat at ln(batch) for ~100 steps on some seeds. Xavier everywhere
    prevents that too but learnt shape 14 points slower (bench/NOTES.md, tenth round)."""
    for m in tower.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.trunc_normal_(tower.patch_embed.weight, std=tower.patch_embed.in_features**-0.5)
    if tower.head is not None:
        for name, m in tower.head.named_modules():
            if isinstance(m, nn.Linear):
                for w in m.weight.chunk(2 if name == "kv" else 1):
                    nn.init.xavier_uniform_(w)
