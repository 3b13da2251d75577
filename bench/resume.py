"""How long an exact resume takes to reach its first training batch, at step 100, 10,000 and 10,999.

The data position is state: a resumed run restores the stream's epoch and origin and replays at most
one chunk (`data.resume_chunk` batches, resampled data), so the time should be flat in the step.
For comparison it prints what replaying the whole stream from its start (the old way) would cost,
from the measured time per batch. The demo's config and shape data, one loader worker, CPU.

    python bench/resume.py     -> bench/results/resume.json
"""

import time
from pathlib import Path

from common import save_results

from navit_clip.config import load_config
from navit_clip.data.demo import ensure_demo_data
from navit_clip.distributed import DistInfo
from navit_clip.tokenizer import tokenizer_for
from navit_clip.train import open_data

DEMO = str(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml")

STEPS = (100, 10_000, 10_999)  # the last: the worst case, a chunk less one batch to replay


def main() -> None:
    data = ensure_demo_data(
        Path(DEMO).parent.parent / "bench" / "results" / "race_data",
        n_train=8000,
        n_heldout=500,
        task="shapes",
    )
    cfg = load_config(DEMO, ["demo=false", f"data.shards={data['train']}"])
    tok = tokenizer_for(cfg)
    info = DistInfo()
    results: dict = {"resume_chunk": cfg.data.resume_chunk, "num_workers": cfg.data.num_workers}
    t0 = time.perf_counter()
    _, batches, _ = open_data(cfg, tok, info, 0, {})
    for _ in range(20):
        next(batches)
    per_batch = (time.perf_counter() - t0) / 20
    results["seconds_per_batch"] = per_batch
    print(f"reading a batch: {per_batch * 1e3:.0f} ms (chunk of {cfg.data.resume_chunk} batches)")
    for step in STEPS:
        t0 = time.perf_counter()
        _, batches, replayed = open_data(cfg, tok, info, step, {"data_batches": step})
        next(batches)
        took = time.perf_counter() - t0
        results[f"resume_s_at_{step}"] = took
        results[f"replayed_at_{step}"] = replayed
        print(
            f"resume at step {step:6d}: first batch after {took:5.1f} s ({replayed} batches replayed); "
            f"replaying from the start would take ~{step * per_batch:6.0f} s"
        )
    save_results("resume", results)


if __name__ == "__main__":
    main()
