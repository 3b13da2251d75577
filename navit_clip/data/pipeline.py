"""Webdataset image-text pipeline: decode, size, patchify, drop tokens and pack inside the workers.

Reading, shard lists, splitting and shuffling are webdataset's; this module adds the NaViT steps
and a streaming first-fit packer whose output is fixed-shape `ImageTextBatch`es.

Shape legend: B sequences, L tokens per sequence, E slots per sequence, C values per patch,
K text context length.
"""

from __future__ import annotations

import functools
import glob
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from navit_clip.data.consumed import (
    ConsumedSamples,
    EpochRecord,
    SampleId,
    drop_consumed,
    number_samples,
    sample_id,
)
from navit_clip.data.decode import IMAGE_EXTS, BadSample, decode_image, find_caption, find_image
from navit_clip.model.clip import CLIP_MEAN, CLIP_STD, NORMALIZE
from navit_clip.packing import (
    PackedBatch,
    ResolutionPolicy,
    TokenDropConfig,
    build_packed_batch,
    drop_tokens,
    first_fit,
    grid_coords,
    sample_drop_rate,
    target_size,
)
from navit_clip.tokenizer import trim_padding

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Where the shards are and how images become packed batches.

    shards: one brace pattern ("shards-{0000..0099}.tar"), or a list of sources, each a pattern or a
    {"urls": pattern, "weight": w} mapping; weights mix the sources in resampled mode. A folder
    path reads an image folder (ROOT/CLASS_NAME/IMAGE, labels from the sorted class folders, once).
    """

    shards: list | str = ""
    patch_size: int = 16
    seq_len: int = 256
    max_images: int = 8
    batch_seqs: int = 8  # B, packed sequences per batch (per rank)
    resolution: ResolutionPolicy = field(default_factory=ResolutionPolicy)
    token_drop: TokenDropConfig = field(default_factory=TokenDropConfig)
    resampled: bool = True  # endless, shards drawn with replacement (pretraining); False: one epoch
    shuffle_buffer: int = 1000
    pack_factor: float = 2.0  # pack when the buffer holds this many batches' worth of tokens
    normalize: str = (
        "clip"  # the model's (model.normalize, model.clip.NORMALIZE); a copy may be given: then equal
    )
    max_pixels: int = 50_000_000
    max_aspect: float = 20.0
    num_workers: int = 2
    seed: int = 0
    label_key: str = ""  # e.g. "cls": an integer class label per sample (negative: skipped as unlabelled); caption optional
    # A worker that reads this many samples in a row without a usable one (or opens 10 shards per
    # listed shard, plus 100, in a row without a sample) stops the run with the skip reasons so far.
    max_bad_in_a_row: int = 10_000
    # Resampled data restart their stream (fresh shard draws and shuffle, seeded by the chunk's index)
    # every resume_chunk batches per rank (rounded up to a multiple of num_workers), so a resumed run
    # replays fewer than resume_chunk batches, whatever its step. Finite data replay within the epoch.
    # Restarts cost accuracy in a way not yet understood (demo: ~5 points at a restart every 100
    # batches, bench/NOTES.md), so they are rare by default.
    resume_chunk: int = 1000

    def validate(self, require_shards: bool = True) -> None:
        if require_shards and not self.shards:
            raise ValueError(
                "data.shards is empty: give a shard pattern such as 'data/shards-{0000..0009}.tar'"
            )
        if self.normalize not in NORMALIZE:
            raise ValueError(f"data.normalize={self.normalize!r} must be one of {tuple(NORMALIZE)}")
        if self.pack_factor < 1:
            raise ValueError(f"data.pack_factor={self.pack_factor} must be at least 1")
        for name in (
            "seq_len",
            "max_images",
            "batch_seqs",
            "patch_size",
            "max_pixels",
            "max_bad_in_a_row",
            "resume_chunk",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name}={getattr(self, name)} must be positive")
        if not self.max_aspect >= 1:
            raise ValueError(
                f"data.max_aspect={self.max_aspect} must be at least 1 (the longer side over the shorter)"
            )
        if self.shuffle_buffer < 0 or self.num_workers < 0:
            raise ValueError("data.shuffle_buffer and data.num_workers must not be negative")
        self.resolution.validate()
        self.token_drop.validate()

    def sources(self) -> list[tuple[list[str], float]]:
        items = self.shards if isinstance(self.shards, list) else [self.shards]
        out = []
        for item in items:
            pattern, weight = (
                (item["urls"], float(item.get("weight", 1.0))) if isinstance(item, dict) else (item, 1.0)
            )
            urls = [u for part in str(pattern).split("::") for u in braceexpand.braceexpand(part)]
            out.append(([path for u in urls for path in _globbed(u)], weight))
        return out

    def check_files(self, name: str = "data.shards") -> None:
        """Local shard paths that do not exist are an error before any work, naming the setting
        `name` (remote URLs and `pipe:` commands are opened by webdataset when read)."""
        if isinstance(self.shards, str) and Path(self.shards).is_dir():
            return
        try:
            sources = self.sources()
        except ValueError as e:  # a glob pattern that matches nothing: name the setting
            raise ValueError(f"{name}: {e}") from None
        for urls, _ in sources:
            missing = [
                u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).is_file()
            ]
            if missing:
                shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
                raise ValueError(f"{name}: {len(missing)} of {len(urls)} shard files do not exist: {shown}")


def _globbed(url: str) -> list[str]:
    """A local glob pattern (`shards/*.tar`, users type them beside brace ranges) as its files, sorted;
    a pattern that matches nothing is an error naming it. URLs and other paths pass as they are."""
    if "://" in url or url.startswith("pipe:") or not any(c in url for c in "*?["):
        return [url]
    found = sorted(glob.glob(url))
    if not found:
        raise ValueError(f"data shards pattern {url!r} matches no file")
    return found


@dataclass
class ImageTextBatch:
    """One packed batch: images, the tokenised caption of every slot, and what it took to make it.

    images: PackedBatch ([B, L, ...], slots [B, E]); its patches are *uint8* pixels: they travel
        4x smaller and `to()` normalises them on the target device with `mean` / `std`.
    text: [B, E, K] token ids (0 for empty slots); keys: [B][E] sample keys ("" for empty slots);
    captions: [B][E] the captions as read ("" for empty slots; several lines where a sample holds
    several captions, as clip_benchmark's retrieval shards do);
    labels: [B, E] class labels when the config names a label_key (-1 for empty slots), else None;
    stats: counts since the worker's last batch (images, tokens kept and dropped, skips by reason,
    corrupt shards).
    """

    images: PackedBatch
    text: torch.Tensor | None
    keys: list[list[str]]
    stats: dict[str, float]
    labels: torch.Tensor | None = None
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    captions: list[list[str]] | None = None
    ids: list[SampleId] = field(default_factory=list)  # every sample this batch used up, bad ones too

    def to(self, device, non_blocking: bool = False, dtype: torch.dtype = torch.float32) -> ImageTextBatch:
        """Move to `device` and normalise the patches there, as `dtype`."""
        images = self.images.to(device, non_blocking)
        if images.patches.dtype == torch.uint8:
            images.patches = normalize_patches(images.patches, self.mean, self.std).to(dtype)
        text = None if self.text is None else self.text.to(device, non_blocking=non_blocking)
        labels = None if self.labels is None else self.labels.to(device, non_blocking=non_blocking)
        return replace(self, images=images, text=text, labels=labels)

    def pin_memory(self) -> ImageTextBatch:
        text = None if self.text is None else self.text.pin_memory()
        labels = None if self.labels is None else self.labels.pin_memory()
        return replace(self, images=self.images.pin_memory(), text=text, labels=labels)


@dataclass
class Example:
    key: str
    caption: str
    patches: torch.Tensor  # [N, C] uint8 pixels
    coords: torch.Tensor  # [N, 2]
    grid: tuple[int, int]
    full_tokens: int  # before dropping
    label: int = -1
    waited: int = 0  # batches this example has been left over for
    id: SampleId = ("", -1)  # (shard URL or folder, index there): navit_clip.data.consumed


def image_to_patches(img: Image.Image, size_hw: tuple[int, int], patch_size: int) -> torch.Tensor:
    """PIL RGB image -> uint8 flat patches [h*w, P*P*3] at pixel size `size_hw` (multiples of P).

    Bilinear resizing with PIL's antialiasing filter; normalisation happens on the training device.
    """
    H, W = size_hw
    if img.size != (W, H):
        img = img.resize((W, H), Image.BILINEAR)
    P = patch_size
    x_HW3 = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return x_HW3.view(H // P, P, W // P, P, 3).permute(0, 2, 1, 3, 4).reshape(-1, P * P * 3)


def normalize_patches(patches_NC: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 patches [..., P*P*3] (channel last) -> float32, (x / 255 - mean) / std per channel."""
    scale = 1 / (255 * torch.tensor(std, device=patches_NC.device))
    shift = -torch.tensor(mean, device=patches_NC.device) / torch.tensor(std, device=patches_NC.device)
    shape = patches_NC.shape
    return (patches_NC.view(*shape[:-1], shape[-1] // 3, 3).float() * scale + shift).view(shape)


class PackedImageText(IterableDataset):
    """Iterable of `ImageTextBatch`es from webdataset shards; use with `make_loader`.

    Each DataLoader worker reads its own shards (split by rank, then by worker), decodes and sizes
    images, drops tokens, and first-fit packs a buffer of examples into B sequences per batch; what
    does not fit waits in the buffer. In finite mode the buffer is flushed at the end, so every
    valid sample is delivered exactly once per epoch. The tokenizer is a navit_clip.tokenizer one (a
    callable with a `pad_id`); captions are trimmed to the longest of each batch.
    """

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
        rank: int = 0,
        world_size: int = 1,
        accum: int = 1,
        first_batch: int = 0,
    ):
        cfg.validate()
        cfg.check_files()
        if tokenizer is not None and not hasattr(tokenizer, "pad_id"):
            raise TypeError("the tokenizer needs a pad_id (see navit_clip.tokenizer.build_tokenizer)")
        self.cfg, self.tokenizer = cfg, tokenizer
        self.rank, self.world_size = rank, world_size
        # Where the stream stands, counted in batches of this rank over the whole run. The DataLoader
        # takes batches from its workers in turn, so this worker's n-th batch is batch
        # first_batch + n * workers + worker; accum of them make one optimiser step, which is what
        # schedules over training (token dropping) read. `origin` is the batch this stream (this epoch
        # of finite data, or the stream a run started or freshly resumed with) began at; resampled
        # streams restart at every resume_chunk batches after it, so first_batch may be any such
        # chunk start (exact resume), and finite ones begin at their origin.
        self.accum, self.first_batch, self.origin = accum, first_batch, first_batch
        self.epoch = 0
        self.mean, self.std = NORMALIZE[cfg.normalize]
        # finite data resumed on another world size: per epoch, the samples the old ranks consumed,
        # left out of this run's reading of that epoch (navit_clip.data.consumed)
        self.consumed: dict[int, ConsumedSamples] = {}
        self.record = EpochRecord()  # the trainer's: what it took of each epoch (navit_clip.train.endless)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def chunk_batches(self, workers: int | None = None) -> int:
        """Batches per resampled chunk: resume_chunk rounded up to a multiple of the loader's workers
        (data.num_workers unless given)."""
        W = max(self.cfg.num_workers if workers is None else workers, 1)
        return -(-self.cfg.resume_chunk // W) * W

    def resume_at(self, done: int) -> int:
        """Position the stream for a run that has consumed `done` batches since `origin` began:
        returns how many batches to replay (fewer than one chunk, or than one epoch of finite data)."""
        if self.cfg.resampled:
            chunk = self.chunk_batches()
            self.first_batch = self.origin + (done - self.origin) // chunk * chunk
        else:
            self.first_batch = self.origin
        return done - self.first_batch

    def optimizer_step(self, emitted: int, worker: int, num_workers: int) -> int:
        """The trainer's optimiser step when this worker's next batch is consumed."""
        return (self.first_batch + emitted * max(num_workers, 1) + worker) // self.accum

    # -- reading (webdataset, or an image folder) -----------------------------------------------
    def _samples(self, seed: int, stats: Counter) -> Iterator[dict]:
        if isinstance(self.cfg.shards, str) and Path(self.cfg.shards).is_dir():
            info = get_worker_info()
            worker, workers = (info.id, info.num_workers) if info else (0, 1)
            parts, consumed = self.world_size * workers, self.consumed.get(self.epoch)
            return folder_samples(self.cfg.shards, self.rank * workers + worker, parts, consumed)
        return self._shard_samples(seed, stats)

    def _shard_samples(self, seed: int, stats: Counter) -> Iterator[dict]:
        pipelines = []
        weights = []
        n_urls = sum(len(urls) for urls, _ in self.cfg.sources())
        guard = _NoSampleGuard(10 * n_urls + 100, self.cfg.shards, stats)
        for urls, weight in self.cfg.sources():
            if self.cfg.resampled:
                stages = [functools.partial(_resampled_shards, urls, seed)]  # a source stage
            else:
                mine = urls[self.rank :: self.world_size]
                if not mine:  # fewer shards than ranks: this rank reads none of this source
                    continue
                stages = [wds.SimpleShardList(mine), wds.split_by_worker]
            stages += [
                guard.count_shards,
                wds.tarfile_to_samples(handler=guard.shard_error),
                guard.saw_sample,
            ]
            if not self.cfg.resampled:  # finite data: samples named for the consumed record
                stages.append(number_samples)
                if self.consumed.get(self.epoch):  # before the shuffle and decode
                    stages.append(functools.partial(drop_consumed, consumed=self.consumed[self.epoch]))
            if self.cfg.shuffle_buffer > 1:
                stages.append(
                    wds.shuffle(
                        self.cfg.shuffle_buffer, initial=self.cfg.shuffle_buffer // 2, rng=random.Random(seed)
                    )
                )
            pipelines.append(wds.DataPipeline(*stages))
            weights.append(weight)
        if len(pipelines) <= 1:
            return iter(pipelines[0] if pipelines else [])
        if self.cfg.resampled:
            return iter(wds.RandomMix(pipelines, weights))
        return (s for p in pipelines for s in p)

    # -- one sample -> Example -----------------------------------------------------------------
    def _example(self, sample: dict, rng: random.Random, g: torch.Generator, step: int) -> Example:
        cfg = self.cfg
        label = -1
        if cfg.label_key:
            try:
                label = int(sample[cfg.label_key])
            except (KeyError, ValueError) as e:
                raise BadSample("no_label", f"{cfg.label_key}: {e}") from e
            if label < 0:  # -1 is the usual mark of an unlabelled sample
                raise BadSample("no_label", f"{cfg.label_key}: {label}")
            caption = find_caption(sample) if "txt" in sample else ""
        else:
            caption = find_caption(sample)
        img, (H, W) = decode_image(
            find_image(sample),
            cfg.max_pixels,
            cfg.max_aspect,
            lambda h, w: target_size(h, w, cfg.resolution, cfg.patch_size, cfg.seq_len, rng, step),
        )
        patches = image_to_patches(img, (H, W), cfg.patch_size)
        h, w = H // cfg.patch_size, W // cfg.patch_size
        rate = sample_drop_rate(h * w, cfg.token_drop, rng, step)
        patches, coords = drop_tokens(patches, grid_coords(h, w), rate, g)
        return Example(
            sample.get("__key__", ""), caption, patches, coords, (h, w), h * w, label, id=sample_id(sample)
        )

    def _batch(self, examples: list[Example], bins: list[list[int]], stats: Counter) -> ImageTextBatch:
        cfg = self.cfg
        B, E = cfg.batch_seqs, cfg.max_images
        packed = build_packed_batch(
            [e.patches for e in examples],
            [e.coords for e in examples],
            bins,
            cfg.seq_len,
            E,
            num_seqs=B,
            grids=[e.grid for e in examples],
        )
        keys = [[""] * E for _ in range(B)]
        raw = [[""] * E for _ in range(B)]
        labels = torch.full((B, E), -1, dtype=torch.long) if cfg.label_key else None
        captions, where = [], []
        for b, members in enumerate(bins):
            for e, i in enumerate(members):
                keys[b][e] = examples[i].key
                raw[b][e] = examples[i].caption
                captions.append(examples[i].caption)
                where.append((b, e))
                if labels is not None:
                    labels[b, e] = examples[i].label
        text = None
        if self.tokenizer is not None:
            ids = self.tokenizer(captions)
            if getattr(self.tokenizer, "trim_padding", True):  # not for bidirectional text towers
                ids = trim_padding(ids, self.tokenizer.pad_id)
            text = torch.zeros(B, E, ids.shape[-1], dtype=ids.dtype)
            if where:
                bb, ee = torch.tensor(where).T
                text[bb, ee] = ids
        placed = [examples[i] for m in bins for i in m]
        kept = sum(e.patches.shape[0] for e in placed)
        full = sum(e.full_tokens for e in placed)
        out_stats = dict(stats)
        out_stats.update(
            images=len(placed),
            tokens=kept,
            tokens_dropped=full - kept,
            padding_fraction=packed.padding_fraction,
            images_per_seq=len(placed) / B,
        )
        stats.clear()
        ids = [examples[i].id for m in bins for i in m]
        return ImageTextBatch(packed, text, keys, out_stats, labels, self.mean, self.std, raw, ids)

    def __iter__(self) -> Iterator[ImageTextBatch]:
        cfg = self.cfg
        info = get_worker_info()
        worker, W = (info.id, info.num_workers) if info else (0, 1)
        if not cfg.resampled:
            stats: Counter = Counter()
            seed = hash((cfg.seed, self.epoch, self.rank, worker))
            yield from self._with_trailing_counts(self._stream(seed, worker, W, 0, None, stats), stats)
            return
        size = self.chunk_batches(W if info else 0)
        chunk, emitted = (self.first_batch - self.origin) // size, 0
        per_worker = size // W
        while True:  # resampled: endless, restarted with a new seed at every chunk boundary
            seed = hash((cfg.seed, self.epoch, self.rank, worker, chunk))
            for batch in self._stream(seed, worker, W, emitted, per_worker):
                emitted += 1
                yield batch
            chunk += 1

    def _with_trailing_counts(self, batches: Iterator[ImageTextBatch], stats: Counter):
        """A finite stream's batches, the last held back until the stream ends, so that skips counted
        after it (bad samples and shards at the end of the data) travel with it instead of being lost.
        A stream that made no batch at all logs its counts (the run's own check then stops it)."""
        held = None
        for batch in batches:
            if held is not None:
                yield held
            held = batch
        trailing = {k: v for k, v in stats.items() if k != "step" and v}
        if held is not None:
            for k, v in trailing.items():
                held.stats[k] = held.stats.get(k, 0) + v
            yield held
        elif trailing:
            counts = ", ".join(f"{k} {v}" for k, v in sorted(trailing.items()))
            log.warning("rank %d: a pass over data.shards made no batch; skipped: %s", self.rank, counts)

    def _stream(
        self, seed: int, worker: int, W: int, emitted: int, limit: int | None, stats: Counter | None = None
    ):
        """Batches from one seeded sample stream: up to `limit` of them (all, for finite data). Skip
        counts go into `stats` and out with each batch."""
        cfg = self.cfg
        seed &= 0x7FFFFFFF
        rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
        stats = Counter() if stats is None else stats
        buffer: list[Example] = []
        buffered_tokens, made = 0, 0
        threshold = cfg.pack_factor * cfg.batch_seqs * cfg.seq_len
        bad_in_a_row = 0
        bad_ids: list[SampleId] = []  # bad samples since the last batch: used up with it
        for sample in self._samples(seed, stats):
            step = self.optimizer_step(emitted + made, worker, W)
            try:
                ex = self._example(sample, rng, g, step)
            except BadSample as e:
                stats[f"skip_{e.reason}"] += 1
                bad_ids.append(sample_id(sample))
                bad_in_a_row += 1
                if bad_in_a_row >= cfg.max_bad_in_a_row:
                    raise NoUsableData(
                        f"{bad_in_a_row} samples in a row without a usable one", cfg.shards, stats
                    ) from e
                continue
            bad_in_a_row = 0
            buffer.append(ex)
            buffered_tokens += ex.patches.shape[0]
            if buffered_tokens >= threshold:
                stats["step"] = step
                batch, buffer = self._pack(buffer, stats)
                batch.ids += bad_ids
                bad_ids = []
                buffered_tokens = sum(e.patches.shape[0] for e in buffer)
                made += 1
                yield batch
                if limit is not None and made >= limit:
                    return
        while buffer:  # finite mode: deliver the rest, in partly filled batches
            stats["step"] = self.optimizer_step(emitted + made, worker, W)
            made += 1
            batch, buffer = self._pack(buffer, stats)
            batch.ids += bad_ids
            bad_ids = []
            yield batch

    def _pack(self, buffer: list[Example], stats: Counter) -> tuple[ImageTextBatch, list[Example]]:
        cfg = self.cfg
        sizes = [e.patches.shape[0] for e in buffer]
        waited = [e.waited for e in buffer]
        bins, left = first_fit(sizes, cfg.seq_len, cfg.max_images, num_seqs=cfg.batch_seqs, priority=waited)
        for i in left:
            buffer[i].waited += 1
        return self._batch(buffer, bins, stats), [buffer[i] for i in left]


class NoUsableData(RuntimeError):
    """A data worker read on and on without producing a usable sample: the run stops with the counts."""

    def __init__(self, what: str, shards=None, stats: Counter | None = None):
        if stats is None:  # re-raised in the main process from a worker's message
            super().__init__(what)
            return
        counts = ", ".join(f"{k} {v}" for k, v in sorted(stats.items())) or "none"
        super().__init__(
            f"no usable sample from data.shards={shards!r}: {what} (skips so far: {counts}). Check that "
            f"the shards hold image files and captions (or data.label_key), and data.max_pixels / "
            f"data.max_aspect"
        )


class _NoSampleGuard:
    """Two webdataset stages around `tarfile_to_samples` and its error handler.

    `count_shards` counts the shards opened and `saw_sample` resets the count when a sample comes out:
    resampled shards never end, so without this, shards that are empty, unreadable or hold no
    image-text sample would be opened forever. `shard_error` counts a corrupt shard once, however many
    errors its reading raises (a member cut short raises once in the member, again in the tar), and
    the sample being assembled when it broke is dropped with it rather than counted again as a
    sample with a missing part."""

    def __init__(self, limit: int, shards, stats: Counter):
        self.limit, self.shards, self.stats, self.in_a_row = limit, shards, stats, 0
        self.opened, self.error_at, self.url, self.broken_url = 0, -1, None, None

    def count_shards(self, src):
        for item in src:
            self.in_a_row += 1
            self.opened += 1
            self.url = item.get("url") if isinstance(item, dict) else None
            if self.in_a_row > self.limit:
                raise NoUsableData(
                    f"{self.in_a_row - 1} shards opened in a row without a sample", self.shards, self.stats
                )
            yield item

    def shard_error(self, exn: Exception) -> bool:
        self.broken_url = self.url
        if self.error_at != self.opened:  # the first error of this shard
            self.error_at = self.opened
            self.stats["corrupt_shard"] += 1
            log.warning("skipping the rest of a corrupt or unreadable shard: %s", exn)
        return True

    def saw_sample(self, src):
        for sample in src:
            if self.broken_url is not None and sample.get("__url__") == self.broken_url:
                self.broken_url = None  # the half-read sample of the corrupt shard
                continue
            self.in_a_row = 0
            yield sample


def folder_classes(root: str | Path) -> list[str]:
    """Class folders of an image-folder dataset (ROOT/CLASS_NAME/IMAGE), sorted: index = label.
    Hidden folders (.ipynb_checkpoints, .git) are not classes."""
    return sorted(p.name for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))


def _resampled_shards(urls: list[str], seed: int) -> Iterator[dict]:
    """Shards drawn with replacement, seeded: webdataset's ResampledShards, whose seeding arguments
    differ between the releases we support (0.2.86 has no `seed`)."""
    rng = random.Random(seed)
    while True:
        yield {"url": urls[rng.randrange(len(urls))]}


def folder_files(root: str | Path) -> list[tuple[int, Path]]:
    """(label, path) of every image of ROOT/CLASS_NAME/.../IMAGE. As torchvision's ImageFolder, a class
    folder's images are read at any depth; hidden files and folders (macOS ._ copies,
    .ipynb_checkpoints) and files of other types are not images."""
    root = Path(root)
    return [
        (label, path)
        for label, name in enumerate(folder_classes(root))
        for path in sorted((root / name).rglob("*"))
        if path.suffix.lower().lstrip(".") in IMAGE_EXTS
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
        and path.is_file()
    ]


def folder_samples(
    root: str | Path, part: int = 0, parts: int = 1, consumed: ConsumedSamples | None = None
) -> Iterator[dict]:
    """Samples {"__key__", ext: bytes, "cls": label} of `folder_files(root)`, every parts-th from part,
    but those in `consumed` (by the folder and the file's index in the listing, unread). The key is
    the path below ROOT without its suffix."""
    files = folder_files(root)
    for i in range(part, len(files), parts):
        if consumed and (str(root), i) in consumed:
            continue
        label, path = files[i]
        yield {
            "__key__": path.relative_to(Path(root)).with_suffix("").as_posix(),
            "__url__": str(root),
            "__index__": i,
            path.suffix.lower().lstrip("."): path.read_bytes(),
            "cls": str(label),
        }


def make_preprocess(
    policy: ResolutionPolicy, patch_size: int, seq_len: int, normalize: str = "clip", seed: int = 0
) -> Callable[[Image.Image], torch.Tensor]:
    """The per-image transform users expect from open_clip: PIL image -> normalised [3, H, W].

    The same sizing as the pipeline (aspect kept, sides multiples of the patch size); the result
    goes straight to `encode_image`.
    """
    mean, std = NORMALIZE[normalize]
    rng = random.Random(seed)

    def preprocess(img: Image.Image) -> torch.Tensor:
        from navit_clip.data.decode import to_rgb

        img = to_rgb(img)
        H, W = target_size(img.height, img.width, policy, patch_size, seq_len, rng)
        if img.size != (W, H):
            img = img.resize((W, H), Image.BILINEAR)
        x_HW3 = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
        return normalize_patches(x_HW3.reshape(1, -1), mean, std).view(H, W, 3).permute(2, 0, 1)

    return preprocess


def make_loader(
    dataset: PackedImageText, num_workers: int | None = None, pin_memory: bool = False
) -> DataLoader:
    """A DataLoader over ready-made batches (batch_size=None: the workers already packed them)."""
    n = dataset.cfg.num_workers if num_workers is None else num_workers
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=n,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=2 if n > 0 else None,
    )
