"""Images/s per worker of our pipeline vs open_clip's training transform, same shards, same run.

Ours: webdataset read, PIL decode, side-length sampling (longer side ~ U(64, 496), aspect kept: about 224 x 224 pixels on average),
resize, patchify, Beta token dropping (mean 0.5), first-fit packing into 4 x 1024-token sequences.
Our patches leave the worker as uint8 and are normalised on the training device (ImageTextBatch.to),
so normalisation is not in our worker's time; open_clip's Normalize is in its.
open_clip: webdataset read, PIL decode, RandomResizedCrop(224), ToTensor, Normalize (its training
transform). Both run in this process (one worker each) over the demo shards, alternating rounds.
Both are timed in steady state (buffers full, shards open), resampled (endless) mode.
Also reports the padding fraction at L = 1024 on the demo data and the pixels per image of each.

    python bench/loader.py     -> bench/results/loader.json
"""

import time

import open_clip
import webdataset as wds
from common import save_results

from navit_clip.data.demo import ensure_demo_data
from navit_clip.data.pipeline import DataConfig, PackedImageText
from navit_clip.packing import ResolutionPolicy, TokenDropConfig

ROUNDS, IMAGES_PER_ROUND = 3, 600
MAX_SIDE = 496  # longer side ~ U(64, 496): about as many pixels per image as 224 x 224 (measured below)


def ours_round(stream, cfg: DataConfig, n: int) -> dict:
    """Steady state: the stream's packing buffer is already full when the clock starts."""
    t0 = time.perf_counter()
    images = tokens = dropped = pixels = batches = 0
    padding = 0.0
    for batch in stream:
        s = batch.stats
        images += s["images"]
        tokens += s["tokens"]
        dropped += s["tokens_dropped"]
        padding += s["padding_fraction"]
        pixels += (s["tokens"] + s["tokens_dropped"]) * cfg.patch_size**2
        batches += 1
        if images >= n:
            break
    dt = time.perf_counter() - t0
    return {
        "images_per_s": images / dt,
        "padding": padding / batches,
        "pixels_per_image": pixels / images,
        "drop_rate": dropped / (dropped + tokens),
    }


def peer_stream(shards: str):
    transform = open_clip.image_transform(224, is_train=True)
    ds = wds.WebDataset(shards, resampled=True, shardshuffle=False).decode("pil").to_tuple("jpg;png", "txt")
    return (transform(img) for img, _ in ds)


def peer_round(stream, n: int) -> float:
    t0 = time.perf_counter()
    count = 0
    for _ in stream:
        count += 1
        if count >= n:
            break
    return count / (time.perf_counter() - t0)


def main() -> None:
    demo = ensure_demo_data()
    cfg = DataConfig(
        shards=demo["train"],
        patch_size=16,
        seq_len=1024,
        max_images=32,
        batch_seqs=4,
        resampled=False,
        shuffle_buffer=0,
        resolution=ResolutionPolicy("side_sampling", 64, MAX_SIDE, "uniform"),
        token_drop=TokenDropConfig("beta", rate=0.5, d_max=0.9),
        num_workers=0,
    )
    ours_stream, theirs = iter(PackedImageText(cfg)), peer_stream(demo["train"])
    next(ours_stream), next(theirs)  # fill the packing buffer, open the shards
    ours, peer = [], []
    for _ in range(ROUNDS):
        ours.append(ours_round(ours_stream, cfg, IMAGES_PER_ROUND))
        peer.append(peer_round(theirs, IMAGES_PER_ROUND))
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    ours_ips, peer_ips = med([o["images_per_s"] for o in ours]), med(peer)
    results = {
        "images_per_s_per_worker_ours": ours_ips,
        "images_per_s_per_worker_peer": peer_ips,
        "ratio_images_per_s_per_worker": ours_ips / peer_ips,
        "padding_fraction_L1024_demo": med([o["padding"] for o in ours]),
        "pixels_per_image_ours": med([o["pixels_per_image"] for o in ours]),
        "pixels_per_image_peer": 224 * 224,
        "token_drop_rate_ours": med([o["drop_rate"] for o in ours]),
        "rounds": ROUNDS,
        "images_per_round": IMAGES_PER_ROUND,
    }
    print(
        f"ours: {ours_ips:.1f} images/s per worker, {results['pixels_per_image_ours']:.0f} px/image before "
        f"dropping (drop rate {results['token_drop_rate_ours']:.2f}), padding at L=1024 "
        f"{100 * results['padding_fraction_L1024_demo']:.2f}%"
    )
    print(f"open_clip: {peer_ips:.1f} images/s per worker, {224 * 224} px/image")
    print(f"ratio ours / open_clip: {results['ratio_images_per_s_per_worker']:.2f}x")
    save_results("loader", results)


if __name__ == "__main__":
    main()
