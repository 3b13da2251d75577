"""Factorized 2D position embeddings: phi_y(row) + phi_x(col), summed (NaViT section 2.1).

Shape legend: B sequences, L tokens, D width.

Variants:
    learned     absolute patch index into a learned table per axis (the paper's best). A grid longer
                than the table (max_grid) is read from it stretched (index * (max_grid - 1) / (side - 1),
                interpolated), as ViTs resize their tables for larger inputs; grids that fit read
                their rows exactly.
    fractional  coordinate / grid side in [0, 1), read from a learned table by linear interpolation;
                any grid size maps onto the same table.
    sinusoidal  fixed sin/cos of the absolute index, as in the original Transformer.
    fourier     learned Fourier features of the absolute index: cos/sin of learned frequencies,
                then a linear map to D.
    rope2d      no additive embedding: queries and keys of every attention layer are rotated by
                their token's row (first half of each head's pairs) and column (second half), as in
                Qwen2-VL's vision tower (`with_rope2d`). Attention then depends on relative offsets
                only; no table, so no grid size is out of range. Positions are patch indices, or
                with `rope_span` > 0 fractional: each image's longer side spans `rope_span` units
                (`rope2d_positions`), so a larger image than any trained falls inside the trained range;
                with `rope_mode` cap, patch indices for images up to `rope_span` patches long and
                only longer ones shrunk to span it (position interpolation).
    learned2d   one learned 2D table of max_grid x max_grid positions (not factorized: ViT's and
                CLIP's, so an open_clip ViT converts into it), resampled to each image's own rows x
                columns with antialiased interpolation: bicubic (timm's `resample_abs_pos_embed`,
                what fixed-size ViTs do at another size) or bilinear (`posemb_interp`: timm's
                NaFlexViT SigLIP models, per image); read unchanged at the table's own grid.
    rope2d+T    rope2d and the additive table T (one of the others) together, e.g.
                rope2d+fractional: relative offsets inside attention, absolute place in the input.
"""

from __future__ import annotations

import math

import torch
from torch import nn

TABLE_KINDS = ("learned", "fractional", "sinusoidal", "fourier", "learned2d")
POSEMB_KINDS = (*TABLE_KINDS, "rope2d", *(f"rope2d+{t}" for t in TABLE_KINDS))
ROPE_THETA = 10000.0


def _interpolate_rows(table_TD: torch.Tensor, pos_BL: torch.Tensor) -> torch.Tensor:
    """Read a table at fractional row positions in [0, T-1] by linear interpolation: -> [B, L, D]."""
    T = table_TD.shape[0]
    pos_BL = pos_BL.clamp(0, T - 1)
    lo_BL = pos_BL.floor().long().clamp(max=T - 2) if T > 1 else torch.zeros_like(pos_BL, dtype=torch.long)
    hi_BL = (lo_BL + 1).clamp(max=T - 1)
    frac_BL1 = (pos_BL - lo_BL.to(pos_BL.dtype)).unsqueeze(-1)
    return table_TD[lo_BL] * (1 - frac_BL1) + table_TD[hi_BL] * frac_BL1


def _cubic_aa(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic kernel with a = -0.5, the one torch's antialiased bicubic resize uses."""
    a = -0.5
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def _triangle(x: torch.Tensor) -> torch.Tensor:
    """The linear kernel torch's antialiased bilinear resize uses."""
    return (1 - x.abs()).clamp(min=0)


INTERP_KERNELS = {"bicubic": _cubic_aa, "bilinear": _triangle}


def resample_weights(
    index_T: torch.Tensor, size_T: torch.Tensor, table_size: int, interp: str = "bicubic"
) -> torch.Tensor:
    """Row `index` of a table of `table_size` rows resized to `size` rows by antialiased `interp`
    (bicubic or bilinear) interpolation, as weights over the table's rows [T, table_size] (each token
    its own output size).

    The same weights as `F.interpolate(..., mode=interp, antialias=True, align_corners=False)`
    (torch's separable kernel: the filter widened by the scale when shrinking, weights cut at the
    table's edges and renormalised), written as tensor ops so that every token of a packed batch is
    resampled to its own image's grid in one product, with no per-size loop or host sync, and it
    traces and exports. At size == table_size the weights are one-hot: the table is read unchanged.
    """
    G = table_size
    size_T1 = size_T.to(torch.float32).clamp(min=1)[:, None]
    scale_T1 = G / size_T1  # input over output
    widen_T1 = scale_T1.clamp(min=1.0)  # the filter is stretched only when shrinking
    center_T1 = scale_T1 * (index_T.to(torch.float32)[:, None] + 0.5)
    j_G = torch.arange(G, device=index_T.device, dtype=torch.float32)
    w_TG = INTERP_KERNELS[interp]((j_G - center_T1 + 0.5) / widen_T1)
    return w_TG / w_TG.sum(-1, keepdim=True)


def resample_table(
    table_GGD: torch.Tensor, coords_L2: torch.Tensor, grid_L2: torch.Tensor, interp: str = "bicubic"
) -> torch.Tensor:
    """The 2D table [G, G, D] resampled to each token's image grid (h, w), read at its (row, col):
    [L, D], float32. Padding (grid 0 x 0) reads a finite mix it never uses."""
    G, D = table_GGD.shape[0], table_GGD.shape[-1]
    wy_LG = resample_weights(coords_L2[:, 0], grid_L2[:, 0], G, interp)
    wx_LG = resample_weights(coords_L2[:, 1], grid_L2[:, 1], G, interp)
    w_LGG = wy_LG[:, :, None] * wx_LG[:, None, :]
    return w_LGG.reshape(-1, G * G) @ table_GGD.to(torch.float32).reshape(G * G, D)


def _sinusoid(pos_BL: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freq = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=pos_BL.device, dtype=torch.float32) / half
    )
    angle_BLh = pos_BL.float().unsqueeze(-1) * freq
    return torch.cat([angle_BLh.sin(), angle_BLh.cos()], dim=-1)


class FactorizedPosEmb(nn.Module):
    """phi_y(row) + phi_x(col) for every token of a packed batch (learned2d: one 2D table's entry).

    forward(coords [B, L, 2] (row, col), grid [B, L, 2] (h, w)) -> [B, L, D] float32 (a zero for
    plain rope2d). `rope`: whether attention rotates queries and keys too (kinds rope2d, rope2d+T).
    """

    def __init__(
        self, kind: str, dim: int, max_grid: int = 64, fourier_features: int = 64, interp: str = "bicubic"
    ):
        super().__init__()
        if kind not in POSEMB_KINDS:
            raise ValueError(f"posemb={kind!r} is not one of {POSEMB_KINDS}")
        if interp not in INTERP_KERNELS:
            raise ValueError(f"posemb_interp={interp!r} is not one of {tuple(INTERP_KERNELS)}")
        self.interp = interp
        if dim % 2:
            raise ValueError(f"width {dim} must be even for factorized position embeddings")
        self.rope = kind.startswith("rope2d")
        kind = kind.removeprefix("rope2d").removeprefix("+") or "none"  # the additive table's kind
        self.kind, self.dim, self.max_grid = kind, dim, max_grid
        if kind == "learned2d":  # ViT's init scale (open_clip's: width^-0.5)
            self.table = nn.Parameter(torch.randn(max_grid, max_grid, dim) * dim**-0.5)
        elif kind in ("learned", "fractional"):
            self.table_y = nn.Parameter(torch.randn(max_grid, dim) * 0.02)
            self.table_x = nn.Parameter(torch.randn(max_grid, dim) * 0.02)
        elif kind == "fourier":
            # Frequencies in cycles per patch, initialised over the band a grid of max_grid can hold.
            self.freq_y = nn.Parameter(torch.randn(fourier_features) / max_grid * 2)
            self.freq_x = nn.Parameter(torch.randn(fourier_features) / max_grid * 2)
            self.proj_y = nn.Linear(2 * fourier_features, dim, bias=False)
            self.proj_x = nn.Linear(2 * fourier_features, dim, bias=False)

    def _axis(self, pos_BL: torch.Tensor, side_BL: torch.Tensor, axis: str) -> torch.Tensor:
        if self.kind == "learned":
            table = self.table_y if axis == "y" else self.table_x
            T = self.max_grid
            side_BL = side_BL.to(torch.float32)
            stretch_BL = torch.where(side_BL > T, (T - 1) / (side_BL - 1).clamp(min=1), 1.0)
            return _interpolate_rows(table, pos_BL.to(torch.float32) * stretch_BL)
        if self.kind == "fractional":
            table = self.table_y if axis == "y" else self.table_x
            frac_BL = pos_BL.float() / side_BL.clamp(min=1).float()
            return _interpolate_rows(table, frac_BL * (self.max_grid - 1))
        if self.kind == "sinusoidal":
            return _sinusoid(pos_BL, self.dim)
        freq = self.freq_y if axis == "y" else self.freq_x
        proj = self.proj_y if axis == "y" else self.proj_x
        angle_BLF = 2 * math.pi * pos_BL.float().unsqueeze(-1) * freq
        return proj(torch.cat([angle_BLF.cos(), angle_BLF.sin()], dim=-1))

    def forward(self, coords_BL2: torch.Tensor, grid_BL2: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":  # plain rope2d: positions enter inside attention only (with_rope2d)
            return torch.zeros((), device=coords_BL2.device)
        if self.kind == "learned2d":
            pos_LD = resample_table(
                self.table, coords_BL2.reshape(-1, 2), grid_BL2.reshape(-1, 2), self.interp
            )
            return pos_LD.view(*coords_BL2.shape[:-1], -1)
        return self._axis(coords_BL2[..., 0], grid_BL2[..., 0], "y") + self._axis(
            coords_BL2[..., 1], grid_BL2[..., 1], "x"
        )


ROPE_MODES = ("span", "cap")


def rope2d_positions(
    coords_BL2: torch.Tensor, grid_BL2: torch.Tensor, span: float, mode: str = "span"
) -> torch.Tensor:
    """Each token's rotary (row, col) position: its patch index (span 0), or, with span > 0, its
    patch centre scaled so that its image's longer side covers `span` units whatever the resolution
    (mode "span": fractional positions, an image larger than any trained one still falls inside the
    trained range), or only shrunk when the longer side is over `span` patches (mode "cap": patch
    steps for the sizes trained on, position interpolation past them)."""
    pos_BL2 = coords_BL2.to(torch.float32)
    if span <= 0:
        return pos_BL2
    longer_BL1 = grid_BL2.to(torch.float32).amax(dim=-1, keepdim=True).clamp_min(1.0)
    scale_BL1 = span / longer_BL1
    if mode == "cap":
        scale_BL1 = scale_BL1.clamp_max(1.0)
    return (pos_BL2 + 0.5) * scale_BL1


def rope2d_rotation(pos_BL2: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin [B, L, 1, d] of each token's 2D rotary angles: d/4 frequencies on its row,
    d/4 on its column, each pair (i, i + d/2) rotated by one angle (rotate-half layout). The sin
    carries the rotation's signs (-sin on the first half, +sin on the second), so a rotation is
    x cos + swap_halves(x) sin (`_rotate`)."""
    if head_dim % 4:
        raise ValueError(f"posemb=rope2d needs a head width divisible by 4, got {head_dim}")
    n = head_dim // 4
    freq_n = ROPE_THETA ** (-torch.arange(n, dtype=torch.float32, device=pos_BL2.device) / n)
    pos_BL2 = pos_BL2.to(torch.float32)
    angle_BLh = torch.cat([pos_BL2[..., :1] * freq_n, pos_BL2[..., 1:] * freq_n], dim=-1)
    cos_BLh, sin_BLh = angle_BLh.cos(), angle_BLh.sin()
    cos_BL1d = torch.cat([cos_BLh, cos_BLh], dim=-1).unsqueeze(-2)
    return cos_BL1d, torch.cat([-sin_BLh, sin_BLh], dim=-1).unsqueeze(-2)


def _rotate(x_BLHd: torch.Tensor, cos_BL1d: torch.Tensor, ssin_BL1d: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) per pair, with the signs inside `ssin`, in
    float32 at least: plain out-of-place ops, the form exporters, tracers and compilers read."""
    x = x_BLHd.to(torch.promote_types(x_BLHd.dtype, torch.float32))
    x1, x2 = x.chunk(2, dim=-1)
    return torch.addcmul(x * cos_BL1d, torch.cat([x2, x1], dim=-1), ssin_BL1d).to(x_BLHd.dtype)


def _rotate_inplace(x_BLHd: torch.Tensor, cos_BL1d: torch.Tensor, ssin_BL1d: torch.Tensor) -> torch.Tensor:
    """`_rotate` with the same arithmetic in two passes instead of three: the product, then one
    multiply-add per half written into it (no swapped copy of x). For `_RotateQK`, where autograd
    does not record."""
    x = x_BLHd.to(torch.promote_types(x_BLHd.dtype, torch.float32))
    h = x.shape[-1] // 2
    out = x * cos_BL1d
    out[..., :h].addcmul_(x[..., h:], ssin_BL1d[..., :h])
    out[..., h:].addcmul_(x[..., :h], ssin_BL1d[..., h:])
    return out.to(x_BLHd.dtype)


class _RotateQK(torch.autograd.Function):
    """`_rotate` of q and k for training, with a hand-written backward. A rotation's transpose is the
    rotation by the opposite angle, so the gradient is the same rotation with the sign of sin flipped:
    two passes over each tensor each way, where autograd through `_rotate` runs three forward and five
    backward (the swap's copy, its split and cat, the sum of the two paths): rope took 8 % of a ViT-Ti
    training step that way, ~6 % this way (bench/NOTES.md, ninth round)."""

    @staticmethod
    def forward(ctx, q, k, cos_BL1d, ssin_BL1d):
        ctx.save_for_backward(cos_BL1d, ssin_BL1d)
        return _rotate_inplace(q, cos_BL1d, ssin_BL1d), _rotate_inplace(k, cos_BL1d, ssin_BL1d)

    @staticmethod
    def backward(ctx, dq, dk):
        cos_BL1d, ssin_BL1d = ctx.saved_tensors
        back = -ssin_BL1d
        return (
            None if dq is None else _rotate_inplace(dq, cos_BL1d, back),
            None if dk is None else _rotate_inplace(dk, cos_BL1d, back),
            None,
            None,
        )


def _rotate_qk(q, k, cos_BL1d, ssin_BL1d):
    """q and k rotated: through `_RotateQK` when autograd records, else (inference, export, tracing,
    torch.compile) through `_rotate`, the plain ops every exporter and compiler reads."""
    traced = torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad) and not traced:
        return _RotateQK.apply(q, k, cos_BL1d, ssin_BL1d)
    return _rotate(q, cos_BL1d, ssin_BL1d), _rotate(k, cos_BL1d, ssin_BL1d)


def with_rope2d(attend, pos_BL2: torch.Tensor, head_dim: int):
    """`attend(q, k, v)` with q and k rotated by each token's (row, col) position first
    (`rope2d_positions`): any attention backend, packed or not, since each token's rotation depends on
    its own position only."""
    cos_BL1d, sin_BL1d = rope2d_rotation(pos_BL2, head_dim)

    def attend_rotated(q_BLHd, k_BLHd, v_BLHd):
        return attend(*_rotate_qk(q_BLHd, k_BLHd, cos_BL1d, sin_BL1d), v_BLHd)

    return attend_rotated
