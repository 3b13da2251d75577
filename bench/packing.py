"""Padding fraction of streaming first-fit packing on NaViT-style image sizes.

Side length ~ U(64, 384) px (the longer side), aspect ratio log-uniform in 1:3..3:1, P = 16. Images
bigger than a sequence are shrunk to fit it (aspect kept), as the `native` policy does. A buffer of
examples is packed into B sequences per batch; what does not fit waits for the next batch and is
placed first then (as the data pipeline does).

    python bench/packing.py      -> bench/results/packing.json
"""

import time

import torch
from common import mixed_grids, save_results

from navit_clip.packing import first_fit

P, BATCHES, SEED = 16, 200, 0


def sample_tokens(n: int, seq_len: int, g: torch.Generator) -> list[int]:
    return [h * w for h, w in mixed_grids(n, seq_len, g, P)]


def streaming_padding(seq_len: int, max_images: int, num_seqs: int, buffer: int) -> dict:
    g = torch.Generator().manual_seed(SEED)
    pending = sample_tokens(buffer, seq_len, g)
    waited = [0] * len(pending)
    used = images = max_wait = 0
    t0 = time.perf_counter()
    for _ in range(BATCHES):
        bins, left = first_fit(pending, seq_len, max_images, num_seqs=num_seqs, priority=waited)
        used += sum(pending[i] for b in bins for i in b)
        images += sum(len(b) for b in bins)
        pending, waited = [pending[i] for i in left], [waited[i] + 1 for i in left]
        max_wait = max([max_wait] + waited)
        fresh = sample_tokens(buffer - len(pending), seq_len, g)
        pending, waited = pending + fresh, waited + [0] * len(fresh)
    dt = time.perf_counter() - t0
    return {
        "padding_fraction": 1 - used / (BATCHES * num_seqs * seq_len),
        "images_per_seq": images / (BATCHES * num_seqs),
        "pack_ms_per_batch": 1e3 * dt / BATCHES,
        "max_batches_waited": max_wait,
    }


def main() -> None:
    results = {"patch_size": P, "batches": BATCHES, "side_px": "U(64,384)", "aspect": "1:3..3:1 log-uniform"}
    for seq_len, max_images, num_seqs, buffer in [(256, 16, 32, 512), (1024, 48, 8, 512)]:
        r = streaming_padding(seq_len, max_images, num_seqs, buffer)
        key = f"L{seq_len}"
        results[f"padding_fraction_{key}"] = r["padding_fraction"]
        results[f"images_per_seq_{key}"] = r["images_per_seq"]
        results[f"pack_ms_per_batch_{key}"] = r["pack_ms_per_batch"]
        results[f"settings_{key}"] = f"E_max={max_images} B={num_seqs} buffer={buffer}"
        results[f"max_batches_waited_{key}"] = r["max_batches_waited"]
        print(
            f"L={seq_len:5d} E_max={max_images} B={num_seqs} buffer={buffer}: padding {100 * r['padding_fraction']:.2f}%"
            f"  images/seq {r['images_per_seq']:.2f}  packing {r['pack_ms_per_batch']:.1f} ms/batch"
            f"  longest wait {r['max_batches_waited']} batches"
        )
    save_results("packing", results)


if __name__ == "__main__":
    main()
