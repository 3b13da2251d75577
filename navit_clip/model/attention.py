"""Block-diagonal attention over packed sequences, behind one function.

A token attends only to the tokens of its own image; padding tokens attend among themselves (so no
row is empty and nothing is NaN) and never leak into an image. Every backend computes exactly that.

Shape legend: B sequences, L tokens, H heads, d head width, k images in a group, n their tokens.

Backends (config `attn_backend`):
    dense     reference: a [B, 1, L, L] boolean mask and scaled_dot_product_attention. Works
              everywhere; cost grows with L^2 per sequence.
    grouped   runs on the real tokens only, gathered once per forward image by image (`plan.to_flat`),
              so padding costs nothing; images of equal token count form one batched unmasked
              SDPA call and cost grows with sum_i n_i^2. The fastest exact variant measured on CPU
              (bench/vision_tower.py). Its inputs are flat: [1, T, H, d], T real tokens.
    flex      FlexAttention with a document mask (block-sparse; cost ~ sum_i n_i^2 at block
              granularity). Meant for CUDA under torch.compile. On CPU it has no backward, so it
              runs (unfused) only under no_grad and falls back to `dense` when gradients are on.
    varlen    torch's variable-length flash attention (torch.nn.attention.varlen), CUDA only.
    auto      on CUDA varlen under bf16/fp16 autocast, else flex; grouped on CPU.
An unavailable backend falls back to `dense` with one logged notice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from navit_clip.model.layers import TOKEN_MULTIPLE, by_length, grouped_attention, sdpa

log = logging.getLogger(__name__)

ATTN_BACKENDS = ("dense", "grouped", "flex", "varlen", "auto")
_warned: set[str] = set()


def _notice_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.warning(msg)


def _has_varlen() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _has_flex() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map a configured backend to one that runs on `device`, falling back to `dense` with a notice."""
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"attn_backend={backend!r} is not one of {ATTN_BACKENDS}")
    if backend == "auto":
        if device.type != "cuda":
            return "grouped"
        # flash varlen only runs in half precision: under bf16/fp16 autocast; flex otherwise
        if _has_varlen() and torch.is_autocast_enabled("cuda"):
            return "varlen"
        return "flex" if _has_flex() else "dense"
    if backend == "varlen" and (device.type != "cuda" or not _has_varlen()):
        _notice_once(
            f"attn_backend='varlen' needs CUDA and torch.nn.attention.varlen; using 'dense' on {device}"
        )
        return "dense"
    if backend == "flex" and not _has_flex():
        _notice_once("attn_backend='flex' needs torch.nn.attention.flex_attention; using 'dense'")
        return "dense"
    if backend == "flex" and device.type != "cuda" and torch.is_grad_enabled():
        # FlexAttention has no CPU backward; inference (no_grad) still runs it, unfused.
        _notice_once(
            f"attn_backend='flex' has no backward on {device}; using 'dense' where gradients are needed"
        )
        return "dense"
    return backend


@dataclass
class AttentionPlan:
    """What a backend needs, derived once per forward from the segment ids (not once per layer).

    Building it reads segment ids on the host: one host-device sync per forward on CUDA.
    """

    backend: str
    B: int
    L: int
    mask_B1LL: torch.Tensor | None = None
    # grouped: token indices (into the flattened B*L tokens) ordered image by image, images of
    # equal length n adjacent; groups lists (k images, n tokens) for each run of equal lengths
    perm: torch.Tensor | None = None
    groups: list[tuple[int, int]] | None = None
    real: int = 0  # grouped: real tokens; perm's last entries are filler (`layers.by_length`)
    block_mask: object | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0

    @property
    def flat(self) -> bool:
        """True when the backend runs on the real tokens only, in `perm` order ([1, T, ...])."""
        return self.backend == "grouped"

    def to_flat(self, x_BL: torch.Tensor) -> torch.Tensor:
        """[B, L, ...] -> [1, T, ...]: the real tokens, image by image in `perm` order, then filler
        (copies of real tokens, up to a multiple of `layers.TOKEN_MULTIPLE`)."""
        return x_BL.reshape(self.B * self.L, *x_BL.shape[2:]).index_select(0, self.perm)[None]

    def from_flat(self, x_1T: torch.Tensor) -> torch.Tensor:
        """[1, T, ...] -> [B, L, ...], zeros at padding tokens (filler dropped)."""
        out = x_1T.new_zeros(self.B * self.L, *x_1T.shape[2:])
        out = out.index_copy(0, self.perm[: self.real], x_1T[0, : self.real])
        return out.view(self.B, self.L, *x_1T.shape[2:])

    @classmethod
    def build(cls, segment_ids_BL: torch.Tensor, backend: str) -> AttentionPlan:
        backend = resolve_backend(backend, segment_ids_BL.device)
        B, L = segment_ids_BL.shape
        plan = cls(backend=backend, B=B, L=L)
        if backend == "dense":
            plan.mask_B1LL = (segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :])[:, None]
        elif backend == "grouped":
            images = by_length(*_runs(segment_ids_BL, include_padding=False), multiple=TOKEN_MULTIPLE)
            plan.perm, plan.groups, plan.real = images.index, images.groups, images.real
        elif backend == "flex":
            from torch.nn.attention.flex_attention import create_block_mask

            seg = segment_ids_BL

            def same_segment(b, h, q_idx, kv_idx):
                return seg[b, q_idx] == seg[b, kv_idx]

            plan.block_mask = create_block_mask(same_segment, B, None, L, L, device=seg.device)
        else:  # varlen: every run of equal segment ids, padding runs included, is one sequence
            starts, lengths = _runs(segment_ids_BL, include_padding=True)
            plan.cu_seqlens = torch.cat([starts, starts[-1:] + lengths[-1:]]).to(torch.int32)
            plan.max_seqlen = int(lengths.max())
        return plan


def _runs(segment_ids_BL: torch.Tensor, include_padding: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Start offsets (in the flattened B*L tokens) and lengths of each contiguous segment run."""
    B, L = segment_ids_BL.shape
    # Offsetting by sequence keeps runs from merging across sequence boundaries.
    key = (segment_ids_BL + torch.arange(B, device=segment_ids_BL.device)[:, None] * (L + 1)).flatten()
    _, lengths = torch.unique_consecutive(key, return_counts=True)
    starts = torch.cumsum(lengths, 0) - lengths
    if not include_padding:
        keep = segment_ids_BL.flatten()[starts] != 0
        starts, lengths = starts[keep], lengths[keep]
    return starts, lengths


def block_attention(
    q_BLHd: torch.Tensor, k_BLHd: torch.Tensor, v_BLHd: torch.Tensor, plan: AttentionPlan
) -> torch.Tensor:
    """Block-diagonal softmax attention; returns the shape of q ([B, L, H, d], or [1, T, H, d] when
    `plan.flat`, i.e. for inputs laid out by `plan.to_flat`)."""
    B, L, H, d = q_BLHd.shape
    if plan.backend == "dense":
        o_BHLd = sdpa(
            q_BLHd.transpose(1, 2), k_BLHd.transpose(1, 2), v_BLHd.transpose(1, 2), attn_mask=plan.mask_B1LL
        )
        return o_BHLd.transpose(1, 2)
    if plan.backend == "grouped":  # tokens already flat, image by image with equal lengths adjacent
        q, k, v = (t.reshape(-1, H, d) for t in (q_BLHd, k_BLHd, v_BLHd))
        return grouped_attention(q, k, v, plan.groups, causal=False).view(B, L, H, d)
    # The fused kernels take one dtype: under autocast, qk-norm (LayerNorm) returns float32 while v is
    # bf16, so all three go to the autocast dtype, as SDPA would do by itself.
    q_BLHd, k_BLHd, v_BLHd = _autocast_dtype(q_BLHd, k_BLHd, v_BLHd)
    if plan.backend == "flex":
        o_BHLd = _flex_attention(q_BLHd.device.type)(
            q_BLHd.transpose(1, 2), k_BLHd.transpose(1, 2), v_BLHd.transpose(1, 2), block_mask=plan.block_mask
        )
        return o_BHLd.transpose(1, 2)
    from torch.nn.attention.varlen import varlen_attn

    if q_BLHd.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            "attn_backend='varlen' (flash attention) needs bf16 or fp16: train with train.precision=bf16, "
            "or use attn_backend=flex or dense for float32"
        )
    q, k, v = (t.reshape(B * L, H, d) for t in (q_BLHd, k_BLHd, v_BLHd))
    o = varlen_attn(q, k, v, plan.cu_seqlens, plan.cu_seqlens, plan.max_seqlen, plan.max_seqlen)
    return o.view(B, L, H, d)


def _autocast_dtype(*tensors: torch.Tensor) -> list[torch.Tensor]:
    device = tensors[0].device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return [t.to(dtype) for t in tensors]
    return list(tensors)


_compiled_flex: dict[str, object] = {}


def _flex_attention(device_type: str):
    """FlexAttention, compiled once on CUDA (eager flex materialises the whole score matrix)."""
    from torch.nn.attention.flex_attention import flex_attention

    if device_type != "cuda":
        return flex_attention
    if "cuda" not in _compiled_flex:
        _compiled_flex["cuda"] = torch.compile(flex_attention, dynamic=True)
    return _compiled_flex["cuda"]
