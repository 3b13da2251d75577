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
from navit_clip.model.layers import (
    ACTIVATIONS,
    build_tower,
    class_token_layout,
    embed_tokens,
    init_weights,
    mean_pool,
    slot_index,
)
from navit_clip.model.posemb import (
    INTERP_KERNELS,
    POSEMB_KINDS,
    ROPE_MODES,
    FactorizedPosEmb,
    rope2d_positions,
    with_rope2d,
)
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
    # antialiased kernel resampling the learned2d table to each image's grid: bicubic (timm's
    # resample_abs_pos_embed, fixed-size ViTs) | bilinear (timm's NaFlexViT SigLIP models)
    posemb_interp: str = "bicubic"
    pool: str = "map"  # map | mean | cls (the class token's output; needs cls_token)
    # the final LayerNorm after pooling instead of on every token before it (timm's fc_norm, the
    # default of its avg-pooled ViTs); per-token features then come out un-normed, as timm's do
    fc_norm: bool = False
    patch_bias: bool | None = None  # a bias in the patch projection; None: bias and not cls_token
    attn_backend: str = "auto"  # dense | grouped | flex | varlen | auto
    ln_eps: float = 1e-6
    ln_pre: bool = False  # LayerNorm on the input tokens, before the first block (open_clip's ln_pre)
    cls_token: bool = False  # one learned class token per image, placed before its patches (CLIP's ViT)
    act: str = "gelu"  # gelu | quick_gelu (OpenAI's CLIP weights) | gelu_tanh (SigLIP2's)
    # Locking (open_clip's --lock-image): frozen parameters get no gradient and no optimiser state.
    # lock_grouping=openclip (open_clip's own ViT): the groups are [patch embedding, class token,
    # positions, ln_pre], each block but the last, [last block, final norm, head], and the image
    # projection. lock_grouping=timm (a converted timm tower, as open_clip's TimmModel.lock groups it
    # with timm's group_matcher): [patch embedding, class token, positions, ln_pre], each block but the
    # last, [last block, final norm], [pooling head, fc_norm] (lock_proj below for the projection);
    # timm_naflex: the same with ln_pre in the last block's group (NaFlexViT's matcher). The last
    # lock_unlocked_groups of them stay trainable; lock_norms=false keeps every LayerNorm trainable.
    lock_grouping: str = "openclip"
    # whether the image projection locks with the tower: true for open_clip's ViTs (its own last group)
    # and a timm tower's own classifier head (in the pooling head's group); false for open_clip's head
    # after a timm trunk, which TimmModel.lock never locks
    lock_proj: bool = True
    lock: bool = False
    lock_unlocked_groups: int = 0
    lock_norms: bool = True

    def validate(self) -> None:
        for name in ("patch_size", "width", "depth", "heads", "max_grid"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.vision.{name}={getattr(self, name)} must be positive")
        if self.width % self.heads:
            raise ValueError(f"vision.width={self.width} is not divisible by vision.heads={self.heads}")
        if self.pool not in ("map", "mean", "cls"):
            raise ValueError(f"vision.pool={self.pool!r} must be 'map', 'mean' or 'cls'")
        if self.pool == "cls" and not self.cls_token:
            raise ValueError("model.vision.pool=cls needs model.vision.cls_token=true")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"model.vision.act={self.act!r} is not one of {tuple(ACTIVATIONS)}")
        if self.posemb_interp not in INTERP_KERNELS:
            raise ValueError(
                f"model.vision.posemb_interp={self.posemb_interp!r} is not one of {tuple(INTERP_KERNELS)}"
            )
        if self.lock_grouping not in ("openclip", "timm", "timm_naflex"):
            raise ValueError(
                f"model.vision.lock_grouping={self.lock_grouping!r} must be openclip, timm or timm_naflex"
            )
        if self.lock_unlocked_groups < 0:
            raise ValueError(f"model.vision.lock_unlocked_groups={self.lock_unlocked_groups} must be >= 0")
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
    # with output_hidden_states: the input tokens (after ln_pre) and every block's output, un-normed,
    # each [B, L, D] in `tokens`' layout: transformers' hidden_states (a VLM reads hidden_states[-2])
    hidden_states: tuple[torch.Tensor, ...] | None = None

    @cached_property
    def tokens(self) -> torch.Tensor:
        """[B, L, D] final-normed per-token features (padding rows are meaningless; class tokens are
        not among them: their outputs are `pooled` with pool=cls). Laid out on first
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
        build_tower(
            self, cfg, FactorizedPosEmb(cfg.posemb, cfg.width, cfg.max_grid, interp=cfg.posemb_interp)
        )
        init_weights(self)

    def forward(self, batch: PackedBatch, output_hidden_states: bool = False) -> VisionOutput:
        B, E = batch.slot_valid.shape
        seg_BL, patches, coords, grid = batch.segment_ids, batch.patches, batch.coords, batch.grid
        is_cls = dest_BL = None
        if self.cls_token is not None:
            seg_BL, patches, coords, grid, is_cls, dest_BL = with_class_tokens(
                seg_BL, patches, coords, grid, E
            )
        plan = AttentionPlan.build(seg_BL, self.cfg.attn_backend)
        if plan.flat:  # the backend runs on real tokens only: padding costs no compute at all
            patches, coords, grid = plan.to_flat(patches), plan.to_flat(coords), plan.to_flat(grid)
            is_cls = plan.to_flat(is_cls) if is_cls is not None else None
        else:  # padding patches are zeroed: NaN there would reach real tokens as 0 x NaN in attention
            patches = patches.masked_fill(seg_BL.unsqueeze(-1) == 0, 0.0)
        x = embed_tokens(self, patches, coords, grid, is_cls)
        attend = partial(block_attention, plan=plan)
        if self.posemb.rope:
            pos = rope2d_positions(coords, grid, self.cfg.rope_span, self.cfg.rope_mode)
            attend = with_rope2d(attend, pos, self.cfg.width // self.cfg.heads)
        hidden = [x] if output_hidden_states else None
        for block in self.blocks:
            x = block(x, attend)
            if hidden is not None:
                hidden.append(x)
        if not self.cfg.fc_norm:
            x = self.norm(x)
        slot_BL = slot_index(seg_BL, E)
        slot_N = plan.to_flat(slot_BL)[0] if plan.flat else slot_BL.flatten()
        if plan.flat:
            slot_N[plan.real :] = B * E  # filler pools into the spare row, dropped like padding
        if is_cls is not None:  # cls pools the class token alone, the others pool the patches alone
            cls_N = is_cls.flatten()
            slot_N = torch.where(cls_N == (self.cfg.pool == "cls"), slot_N, B * E)
        x_ND = x.flatten(0, 1)  # a view either way ([1, T, D] flat): its backward copies nothing
        if self.head is not None:
            pooled = self.head(x_ND, slot_N, batch.slot_valid.flatten())
        else:  # the mean of one token is that token: pool=cls reads each class token's output
            pooled = mean_pool(x_ND, slot_N, B * E)
        if self.cfg.fc_norm:
            pooled = self.norm(pooled)
        pooled_BED = pooled.view(B, E, -1)
        layout = plan.from_flat if plan.flat else _same
        if dest_BL is not None:  # the patch tokens, back in the batch's own [B, L] layout
            layout = partial(_patch_tokens, layout, dest_BL)
        return VisionOutput(
            pooled=pooled_BED,
            slot_valid=batch.slot_valid,
            lay_out=partial(layout, x),
            hidden_states=tuple(layout(h) for h in hidden) if hidden is not None else None,
        )

    def lock_groups(self, proj: list[nn.Parameter] = ()) -> list[list[nn.Parameter]]:
        """The tower's parameters, and its projection's `proj` where they lock with it, in its lock
        groups, first to last (see VisionConfig.lock_grouping)."""
        proj = list(proj) if self.cfg.lock_proj else []
        first = [*self.patch_embed.parameters(), *self.posemb.parameters()]
        if self.cls_token is not None:
            first.append(self.cls_token)
        blocks = [list(b.parameters()) for b in self.blocks]
        head = list(self.head.parameters()) if self.head is not None else []
        if self.cfg.lock_grouping.startswith("timm"):  # `^norm` joins the last block; the rest comes last
            last, pool = list(blocks[-1]), [*head, *proj]
            (last if self.cfg.lock_grouping == "timm_naflex" else first).extend(self.ln_pre.parameters())
            (pool if self.cfg.fc_norm else last).extend(self.norm.parameters())
            return [g for g in (first, *blocks[:-1], last, pool) if g]
        first.extend(self.ln_pre.parameters())
        return [g for g in (first, *blocks[:-1], [*blocks[-1], *self.norm.parameters(), *head], proj) if g]

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


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


def _patch_tokens(layout: Callable, dest_BL: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    x_BXD = layout(x)  # [B, L + E, D] with class tokens
    return x_BXD.gather(1, dest_BL[..., None].expand(-1, -1, x_BXD.shape[-1]))


def with_class_tokens(seg_BL, patches_BLC, coords_BL2, grid_BL2, E: int):
    """A packed layout with each image's class token put before its patches (`class_token_layout`):
    the four tensors at L + E tokens a sequence, which tokens are class tokens [B, L + E], and where
    each old token went [B, L]. The
    class tokens carry their image's segment id and grid, and patch (0, 0)'s coordinates (unused: the
    class token is not position-embedded)."""
    B, L = seg_BL.shape
    dest_BL, cls_BE = class_token_layout(seg_BL, E)
    slot_E = torch.arange(1, E + 1, device=seg_BL.device)
    # each image's grid, for its class token (rope reads it); empty slots get 0 x 0, as padding does
    grid_BE2 = grid_BL2.new_zeros(B, E + 1, 2).scatter_reduce(
        1, seg_BL[..., None].expand(-1, -1, 2), grid_BL2, "amax"
    )[:, 1:]
    n_valid_B1 = seg_BL.amax(1, keepdim=True)

    def place(x_BL, cls_values_BE, fill=0):
        out = x_BL.new_full((B, L + E, *x_BL.shape[2:]), fill)
        out.scatter_(1, dest_BL.view(B, L, *[1] * (x_BL.dim() - 2)).expand_as(x_BL), x_BL)
        idx = cls_BE.view(B, E, *[1] * (x_BL.dim() - 2)).expand(B, E, *x_BL.shape[2:])
        return out.scatter(1, idx, cls_values_BE.to(x_BL.dtype).expand(B, E, *x_BL.shape[2:]))

    valid_BE = slot_E <= n_valid_B1
    seg = place(seg_BL, torch.where(valid_BE, slot_E, 0))
    is_cls = place(torch.zeros_like(seg_BL, dtype=torch.bool), valid_BE)
    patches = place(patches_BLC, patches_BLC.new_zeros(1, 1, patches_BLC.shape[-1]))
    coords = place(coords_BL2, coords_BL2.new_zeros(1, 1, 2))
    grid = place(grid_BL2, grid_BE2)
    return seg, patches, coords, grid, is_cls, dest_BL
