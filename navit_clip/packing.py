"""Patch n' Pack: patchify images at native aspect ratio and pack them into fixed-length sequences.

Pure tensor layout: no I/O and no model code.

Shape legend:
    B      packed sequences in a batch
    L      tokens per packed sequence (seq_len)
    E      image slots per sequence (E_max)
    N      tokens of one image (h * w)
    C      values per patch (P * P * 3, laid out as (row-in-patch, col-in-patch, channel))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F


def grid_size(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """The patch grid (h, w) an image of `height` x `width` pixels is resized to.

    Rule: each side is rounded to the *nearest* multiple of the patch size, never below one patch.
    Each side moves by at most P/2 pixels, so the aspect ratio is kept within one patch.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size {height}x{width} is empty; every side must be at least 1 pixel")
    return max(1, round(height / patch_size)), max(1, round(width / patch_size))


def patchify(image_3HW: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut one image into flat patches.

    Args:
        image_3HW: float image [3, H, W]. Sides that are not multiples of `patch_size` are first
            resized (bilinear, antialiased) to the grid given by `grid_size`.
    Returns:
        patches_NC: [h*w, P*P*3] in row-major patch order, each patch flattened as (py, px, channel).
        coords_N2: [h*w, 2] long, the (row, col) of each patch in the grid.
    """
    if image_3HW.ndim != 3 or image_3HW.shape[0] != 3:
        raise ValueError(f"expected an image of shape [3, H, W], got {tuple(image_3HW.shape)}")
    P = patch_size
    h, w = grid_size(image_3HW.shape[1], image_3HW.shape[2], P)
    if (h * P, w * P) != tuple(image_3HW.shape[1:]):
        image_3HW = F.interpolate(
            image_3HW[None].float(), size=(h * P, w * P), mode="bilinear", antialias=True, align_corners=False
        )[0]
    patches_NC = image_3HW.reshape(3, h, P, w, P).permute(1, 3, 2, 4, 0).reshape(h * w, P * P * 3)
    return patches_NC, grid_coords(h, w)


def grid_coords(h: int, w: int) -> torch.Tensor:
    """(row, col) of every cell of an h x w grid in row-major order: [h*w, 2] long."""
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    return torch.stack([rows, cols], dim=1)


def unpatchify(patches_NC: torch.Tensor, h: int, w: int, patch_size: int) -> torch.Tensor:
    """Inverse of `patchify` for an image already on the patch grid: [h*w, C] -> [3, h*P, w*P]."""
    P = patch_size
    return patches_NC.reshape(h, w, P, P, 3).permute(4, 0, 2, 1, 3).reshape(3, h * P, w * P)


@dataclass
class PackedBatch:
    """Fixed-shape tensors for B packed sequences of L tokens with at most E images each.

    patches:      [B, L, C]  float, padding tokens are zero
    coords:       [B, L, 2]  long, (row, col) of the token in its image's patch grid
    grid:         [B, L, 2]  long, (h, w) of the token's image grid (for fractional embeddings)
    segment_ids:  [B, L]     long, 0 = padding, k in 1..E = the token belongs to slot k-1
    slot_valid:   [B, E]     bool, slot holds an image
    slot_example: [B, E]     long, index of the input example in the slot, -1 when empty
    """

    patches: torch.Tensor
    coords: torch.Tensor
    grid: torch.Tensor
    segment_ids: torch.Tensor
    slot_valid: torch.Tensor
    slot_example: torch.Tensor

    @property
    def padding_fraction(self) -> float:
        return float((self.segment_ids == 0).float().mean())

    @property
    def num_images(self) -> int:
        return int(self.slot_valid.sum())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        return PackedBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})

    def pin_memory(self) -> PackedBatch:
        return PackedBatch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})


def first_fit(
    sizes: Sequence[int], seq_len: int, max_images: int, num_seqs: int | None = None, decreasing: bool = True
) -> tuple[list[list[int]], list[int]]:
    """Greedy first-fit bin packing of examples (by token count) into sequences.

    Each example goes into the first sequence with room for its tokens and a free image slot.
    With `decreasing` (the default) examples are visited largest first (first-fit decreasing),
    which leaves less padding than arrival order; ties keep arrival order, so the result is a
    pure function of the input.

    Args:
        sizes: token count of every example.
        seq_len: L, tokens per sequence.
        max_images: E_max, images per sequence.
        num_seqs: B. If given, at most B sequences are filled and examples that fit nowhere are
            returned as leftovers (a streaming packer keeps them for the next batch); if None,
            sequences are opened as needed and no example is left over.
    Returns:
        (bins, leftovers): bins[b] lists the example indices of sequence b in placement order;
        leftovers lists indices that were not placed, in arrival order.
    """
    if seq_len < 1 or max_images < 1:
        raise ValueError(f"seq_len={seq_len} and max_images={max_images} must both be at least 1")
    for i, n in enumerate(sizes):
        if n > seq_len:
            raise ValueError(
                f"example {i} has {n} tokens, more than seq_len={seq_len}; raise seq_len or shrink the image "
                f"(lower its max side or token budget)"
            )
        if n < 1:
            raise ValueError(f"example {i} has {n} tokens; every image needs at least one patch")
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i]) if decreasing else range(len(sizes))
    bins: list[list[int]] = []
    room: list[int] = []
    leftovers: list[int] = []
    for i in order:
        n = sizes[i]
        for b in range(len(bins)):
            if room[b] >= n and len(bins[b]) < max_images:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            if num_seqs is None or len(bins) < num_seqs:
                bins.append([i])
                room.append(seq_len - n)
            else:
                leftovers.append(i)
    return bins, sorted(leftovers)


def build_packed_batch(
    patches: Sequence[torch.Tensor],
    coords: Sequence[torch.Tensor],
    bins: Sequence[Sequence[int]],
    seq_len: int,
    max_images: int,
    num_seqs: int | None = None,
) -> PackedBatch:
    """Lay out examples into a `PackedBatch` following a packing plan (`first_fit`'s bins).

    Args:
        patches: per example [N_i, C]; coords: per example [N_i, 2] (row, col).
        bins: example indices per sequence. num_seqs: B (>= len(bins)); extra sequences are padding.
    """
    B = len(bins) if num_seqs is None else num_seqs
    if len(bins) > B:
        raise ValueError(f"plan has {len(bins)} sequences but num_seqs={B}")
    C = patches[0].shape[1] if len(patches) else 0
    L, E = seq_len, max_images
    batch = PackedBatch(
        patches=torch.zeros(B, L, C, dtype=patches[0].dtype if len(patches) else torch.float32),
        coords=torch.zeros(B, L, 2, dtype=torch.long),
        grid=torch.zeros(B, L, 2, dtype=torch.long),
        segment_ids=torch.zeros(B, L, dtype=torch.long),
        slot_valid=torch.zeros(B, E, dtype=torch.bool),
        slot_example=torch.full((B, E), -1, dtype=torch.long),
    )
    for b, members in enumerate(bins):
        if len(members) > E:
            raise ValueError(f"sequence {b} holds {len(members)} images, more than max_images={E}")
        if not members:
            continue
        seq_patches = torch.cat([patches[i] for i in members])
        n_total = seq_patches.shape[0]
        if n_total > L:
            raise ValueError(f"sequence {b} holds {n_total} tokens, more than seq_len={L}")
        seq_coords = torch.cat([coords[i] for i in members])
        lengths = torch.tensor([patches[i].shape[0] for i in members])
        # The grid of an image is one past its largest (row, col) coordinate.
        grids = torch.stack([coords[i].max(0).values + 1 for i in members])
        batch.patches[b, :n_total] = seq_patches
        batch.coords[b, :n_total] = seq_coords
        batch.grid[b, :n_total] = grids.repeat_interleave(lengths, dim=0)
        batch.segment_ids[b, :n_total] = torch.arange(1, len(members) + 1).repeat_interleave(lengths)
        batch.slot_valid[b, : len(members)] = True
        batch.slot_example[b, : len(members)] = torch.tensor(list(members))
    return batch


def pack_images(
    images: Sequence[torch.Tensor], patch_size: int, seq_len: int, max_images: int
) -> PackedBatch:
    """Patchify a list of [3, H, W] images and pack all of them (first-fit decreasing)."""
    cut = [patchify(img, patch_size) for img in images]
    bins, _ = first_fit([p.shape[0] for p, _ in cut], seq_len, max_images)
    return build_packed_batch([p for p, _ in cut], [c for _, c in cut], bins, seq_len, max_images)


def unpack_slots(values_BED: torch.Tensor, batch: PackedBatch, num_examples: int) -> torch.Tensor:
    """Gather per-slot values back into input order: [B, E, D] -> [num_examples, D]."""
    valid = batch.slot_valid
    out = values_BED.new_zeros(num_examples, values_BED.shape[-1])
    out[batch.slot_example[valid]] = values_BED[valid]
    return out
