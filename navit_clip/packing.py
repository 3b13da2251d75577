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

import math
import random
import statistics
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
        return PackedBatch(
            **{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)}
        )

    def pin_memory(self) -> PackedBatch:
        return PackedBatch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})


def first_fit(
    sizes: Sequence[int],
    seq_len: int,
    max_images: int,
    num_seqs: int | None = None,
    decreasing: bool = True,
    priority: Sequence[int] | None = None,
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
        priority: optional per-example rank, higher placed first (before size order). A streaming
            packer passes how many batches each example has waited: leftovers then go first, so
            no example waits long and small images do not pile up in the buffer (which would
            fill sequences with E_max tiny images and leave padding).
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
    prio = priority if priority is not None else [0] * len(sizes)
    if decreasing:
        order = sorted(range(len(sizes)), key=lambda i: (-prio[i], -sizes[i]))
    else:
        order = sorted(range(len(sizes)), key=lambda i: -prio[i])
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
    grids: Sequence[tuple[int, int]] | None = None,
) -> PackedBatch:
    """Lay out examples into a `PackedBatch` following a packing plan (`first_fit`'s bins).

    Args:
        patches: per example [N_i, C]; coords: per example [N_i, 2] (row, col).
        bins: example indices per sequence. num_seqs: B (>= len(bins)); extra sequences are padding.
        grids: per example (h, w) of its full patch grid; default: one past the largest coordinate
            (pass it when tokens were dropped).
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
        if grids is None:  # one past the largest (row, col) coordinate
            seq_grids = torch.stack([coords[i].max(0).values + 1 for i in members])
        else:
            seq_grids = torch.tensor([list(grids[i]) for i in members], dtype=torch.long)
        batch.patches[b, :n_total] = seq_patches
        batch.coords[b, :n_total] = seq_coords
        batch.grid[b, :n_total] = seq_grids.repeat_interleave(lengths, dim=0)
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


# ---------------------------------------------------------------------------------------------
# Resolution sampling and token dropping (NaViT sections 3.1 and 3.2). Pure functions of sizes,
# token counts and a torch.Generator: the data pipeline calls them per image.
# ---------------------------------------------------------------------------------------------

RESOLUTION_POLICIES = ("native", "side_sampling", "budget")
SIDE_DISTRIBUTIONS = ("uniform", "truncnorm")
DROP_KINDS = ("none", "fixed", "beta", "resolution")


@dataclass
class ResolutionPolicy:
    """How each image's size is chosen before patchifying; the aspect ratio is always kept.

    native          the image's own size, shrunk only to fit `max_side` and `seq_len` tokens.
    side_sampling   the longer side is drawn from [min_side, max_side]: `uniform`, or `truncnorm`,
                    the paper's best: N(-0.5, 1) truncated to [-1, 1], mapped linearly onto the range
                    (biased towards low resolutions).
    budget          scaled up or down to the largest size with at most `tokens` patches (evaluation
                    at a fixed token budget per image).
    schedule        optional [(step, max_side), ...] for side_sampling: the range's upper end,
                    interpolated linearly over training steps (`max_side` is unused then): a
                    progressive reach. One late reach in a 90 s fine-tune bought the large budgets
                    and cost the checkpoint's own (bench/NOTES.md, sixteenth round).
    reach_prob      for side_sampling: this share of images draws its side from [max_side (at the
    reach_side      step), reach_side] instead: a tail of large images, so that a run centred on one
                    size still trains the grids of large token budgets (0: no tail).
    budget_prob     for side_sampling: this share of images is sized as `budget` sizes it (the largest
                    size with at most `tokens` patches, aspect kept) instead of drawing a side; the
                    rest draw from the range and the tail. A fine-tune at a checkpoint's own token
                    count (`tokens`) with the other budgets still trained (bench/NOTES.md, 22nd round).
    """

    kind: str = "native"
    min_side: int = 64
    max_side: int = 512
    distribution: str = "uniform"
    tokens: int = 256
    schedule: list[tuple[int, int]] | None = None
    reach_prob: float = 0.0
    reach_side: int = 0
    budget_prob: float = 0.0

    def validate(self) -> None:
        if self.kind not in RESOLUTION_POLICIES:
            raise ValueError(f"resolution.kind={self.kind!r} is not one of {RESOLUTION_POLICIES}")
        if self.distribution not in SIDE_DISTRIBUTIONS:
            raise ValueError(
                f"resolution.distribution={self.distribution!r} is not one of {SIDE_DISTRIBUTIONS}"
            )
        if not 1 <= self.min_side <= self.max_side:
            raise ValueError(
                f"resolution sides must satisfy 1 <= min_side ({self.min_side}) <= max_side ({self.max_side})"
            )
        if self.schedule:
            _check_schedule(self.schedule, "resolution.schedule")
            if self.kind != "side_sampling":
                raise ValueError(f"resolution.schedule needs kind=side_sampling, not {self.kind!r}")
            if min(side for _, side in self.schedule) < self.min_side:
                raise ValueError(
                    f"resolution.schedule={self.schedule}: every max_side must be >= min_side ({self.min_side})"
                )
        if self.budget_prob:
            where = f"resolution.budget_prob={self.budget_prob}, tokens={self.tokens}"
            if self.kind != "side_sampling":
                raise ValueError(
                    f"{where}: a share of budget-sized images needs kind=side_sampling, not {self.kind!r}"
                )
            if not 0 < self.budget_prob <= 1 or self.tokens < 1:
                raise ValueError(f"{where}: budget_prob is a share of images, in (0, 1], and tokens >= 1")
        if self.reach_prob:
            where = f"resolution.reach_prob={self.reach_prob}, reach_side={self.reach_side}"
            if self.kind != "side_sampling":
                raise ValueError(f"{where}: a reach needs kind=side_sampling, not {self.kind!r}")
            if not 0 < self.reach_prob <= 1:
                raise ValueError(f"{where}: reach_prob is a share of images, in (0, 1]")
            top = self._range_top()
            if self.reach_side <= top:
                raise ValueError(f"{where}: reach_side must be past the range's largest max_side ({top})")

    def max_side_at(self, step: int) -> int:
        """The upper end of the side range at training step `step`."""
        return round(_interpolate(self.schedule, step, self.max_side))

    def largest_side(self) -> int:
        """The largest side any step can draw."""
        return self.reach_side if self.reach_prob else self._range_top()

    def _range_top(self) -> int:
        """The side range's largest upper end over the run (the tail aside)."""
        return max(side for _, side in self.schedule) if self.schedule else self.max_side


def _check_schedule(schedule, where: str) -> None:
    steps = [step for step, _ in schedule]
    if any(b < a for a, b in zip(steps, steps[1:])) or steps[0] < 0:
        raise ValueError(f"{where}={schedule}: steps must be >= 0 and in increasing order")


def _interpolate(schedule, step: int, default: float) -> float:
    """A value of [(step, value), ...] at `step`, linear between points, constant outside them
    (`default` when there is no schedule)."""
    if not schedule:
        return default
    if step <= schedule[0][0]:
        return schedule[0][1]
    for (s0, v0), (s1, v1) in zip(schedule, schedule[1:]):
        if step <= s1:
            return v0 + (v1 - v0) * (step - s0) / max(s1 - s0, 1)
    return schedule[-1][1]


def budget_grid(height: int, width: int, patch_size: int, max_tokens: int, merge: int = 1) -> tuple[int, int]:
    """The largest patch grid (h, w) with the image's aspect ratio and at most `max_tokens` patches,
    sides multiples of `merge` (2 for a 2 x 2 token merge). Scales up as well as down.

    The exported encoder's processor (navit_encoder.NaViTProcessor.grid_for) repeats this rule,
    torch-only; a test keeps the two equal.
    """
    unit = patch_size * merge
    scale = math.sqrt(max_tokens * patch_size**2 / (height * width)) * 1.05  # a little over, then down
    while True:
        h = max(1, round(height * scale / unit)) * merge
        w = max(1, round(width * scale / unit)) * merge
        if h * w <= max_tokens or (h == merge and w == merge):
            return h, w
        scale *= 0.98


def fit_grid(height: int, width: int, patch_size: int, max_tokens: int) -> tuple[int, int]:
    """The patch grid of an image, shrunk (aspect kept, `budget_grid`) only if it has more than
    `max_tokens` patches: how an image that would not fit a sequence is made to fit."""
    h, w = grid_size(height, width, patch_size)
    return (h, w) if h * w <= max_tokens else budget_grid(height, width, patch_size, max_tokens)


def policy_max_tokens(policy: ResolutionPolicy, patch_size: int) -> int:
    """The most tokens one image can have under `policy` (before any seq_len cap)."""
    if policy.kind == "budget":
        return policy.tokens
    side = -(-policy.largest_side() // patch_size) + 1  # rounding to the nearest multiple can add one patch
    return max(side * side, policy.tokens if policy.budget_prob else 0)


def _truncnorm_unit(rng: random.Random, mean: float = -0.5, std: float = 1.0) -> float:
    """One draw of N(mean, std) truncated to [-1, 1], by inverse CDF."""
    normal = statistics.NormalDist(mean, std)
    lo, hi = normal.cdf(-1.0), normal.cdf(1.0)
    return normal.inv_cdf(min(max(lo + (hi - lo) * rng.random(), 1e-12), 1 - 1e-12))


def target_size(
    height: int,
    width: int,
    policy: ResolutionPolicy,
    patch_size: int,
    seq_len: int,
    rng: random.Random,
    step: int = 0,
) -> tuple[int, int]:
    """The pixel size (H, W), multiples of `patch_size`, an image is resized to under `policy` (at
    training step `step`, which a scheduled side range reads).

    A `budget_prob` share of side-sampled images is sized as the `budget` kind sizes it. Otherwise
    the longer side is set (native: kept, at most max_side; side_sampling: drawn), the shorter one
    follows the aspect ratio, both are rounded to the nearest patch multiple (so the aspect ratio is
    kept within one patch), and the result is shrunk further if it has more than `seq_len` tokens.
    """
    long_side = max(height, width)
    budget_sized = policy.budget_prob and rng.random() < policy.budget_prob
    if policy.kind == "budget" or budget_sized:
        h, w = budget_grid(height, width, patch_size, min(policy.tokens, seq_len))
        return h * patch_size, w * patch_size
    if policy.kind == "native":
        side = min(long_side, policy.max_side)
    else:
        low, high = policy.min_side, policy.max_side_at(step)
        if policy.reach_prob and rng.random() < policy.reach_prob:  # the tail: past the range
            low, high = high, policy.reach_side
        u = rng.random() if policy.distribution == "uniform" else (_truncnorm_unit(rng) + 1) / 2
        side = low + u * (high - low)
    scale = side / long_side
    h, w = fit_grid(max(1, round(height * scale)), max(1, round(width * scale)), patch_size, seq_len)
    return h * patch_size, w * patch_size


@dataclass
class TokenDropConfig:
    """Per-image token dropping before packing (freed room takes more images).

    none        keep every token.
    fixed       every image drops `rate`.
    beta        rate = u * d_max with u ~ Beta of mean rate / d_max and variance 0.3 * mu * (1 - mu)
                (the paper's parametrisation; `rate` is the mean drop rate).
    resolution  rate ~ N(mu(n), 0.02) truncated to [0, d_max], mu growing linearly with the image's
                token count n from `rate` at 0 tokens to `d_max` at `max_tokens`.
    schedule    optional [(step, rate), ...]: `rate` is interpolated linearly over training steps
                (the paper found decreasing schedules best).
    """

    kind: str = "none"
    rate: float = 0.0
    d_max: float = 0.9
    max_tokens: int = 1024
    schedule: list[tuple[int, float]] | None = None

    def validate(self) -> None:
        if self.kind not in DROP_KINDS:
            raise ValueError(f"token_drop.kind={self.kind!r} is not one of {DROP_KINDS}")
        if not 0 <= self.rate < 1 or not 0 < self.d_max < 1:
            raise ValueError(
                f"token_drop.rate={self.rate} must be in [0, 1) and d_max={self.d_max} in (0, 1)"
            )
        if self.kind == "beta" and not self.rate < self.d_max:
            raise ValueError(
                f"token_drop.rate={self.rate} must be below d_max={self.d_max} for the beta kind"
            )
        if self.schedule:
            _check_schedule(self.schedule, "token_drop.schedule")
            top = self.d_max if self.kind == "beta" else 1.0
            if any(not 0 <= rate < top for _, rate in self.schedule):
                raise ValueError(
                    f"token_drop.schedule={self.schedule}: every rate must be in [0, {top:g}) for kind={self.kind}"
                )

    def rate_at(self, step: int) -> float:
        return _interpolate(self.schedule, step, self.rate)


def sample_drop_rate(n_tokens: int, cfg: TokenDropConfig, rng: random.Random, step: int = 0) -> float:
    """The drop rate of one image of `n_tokens` tokens at training step `step`."""
    rate = cfg.rate_at(step)
    if cfg.kind == "none":
        return 0.0
    if cfg.kind == "fixed":
        return max(rate, 0.0)
    if cfg.kind == "beta":
        if rate <= 0:  # a schedule may reach 0: Beta(0, b) is not defined
            return 0.0
        mu = rate / cfg.d_max
        # Beta(a, b) with mean mu and variance 0.3 mu (1 - mu): a + b = mu (1 - mu) / var - 1 = 7/3
        total = 1 / 0.3 - 1
        return rng.betavariate(mu * total, (1 - mu) * total) * cfg.d_max
    # resolution: `rate` is the mean at 0 tokens, so a rate of 0 still drops from large images
    mean = rate + (cfg.d_max - rate) * min(n_tokens / cfg.max_tokens, 1.0)
    return min(max(rng.gauss(mean, 0.02), 0.0), cfg.d_max)


def drop_tokens(
    patches_NC: torch.Tensor, coords_N2: torch.Tensor, rate: float, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep a random subset of round(N * (1 - rate)) tokens (at least one), in their original order.

    Coordinates travel with the kept tokens, so position embeddings still see where each came from.
    """
    n = patches_NC.shape[0]
    keep = max(1, round(n * (1 - rate)))
    if keep >= n:
        return patches_NC, coords_N2
    idx = torch.randperm(n, generator=g)[:keep].sort().values
    return patches_NC[idx], coords_N2[idx]
