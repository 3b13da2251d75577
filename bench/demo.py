"""The demo as a user runs it on a fresh machine: `python train_clip.py` (no argument), timed with the
generation of its data (demo_data/ is removed first), then its accuracy against tokens per image with
`navit-clip eval` and the demo's own zero-shot templates. Prints the wall-clock, the final zero-shot
top-1 / top-5 and the budget table; the accuracy-vs-tokens plot lands in bench/results/demo_run/eval/.

    python bench/demo.py      -> bench/results/demo.json (about 5 minutes on 2 cores)
"""

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import save_results

from navit_clip.data.demo import TASKS

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "bench" / "results" / "demo_run"


def main() -> None:
    shutil.rmtree(RUN, ignore_errors=True)
    shutil.rmtree(ROOT / "demo_data", ignore_errors=True)  # time what a first run costs, generation included
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "train_clip.py", f"train.output_dir={RUN}"], cwd=ROOT, capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"train_clip.py failed:\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("zero-shot"))
    top1, top5 = (float(v) / 100 for v in re.findall(r"top-[15] ([\d.]+)%", line))
    print(f"python train_clip.py: {wall:.0f} s wall-clock, generating demo_data/ included")
    print(line)
    ckpt = sorted(RUN.glob("step_*.pt"))[-1]
    templates = RUN / "templates.txt"
    templates.write_text("\n".join(TASKS["glyphs"].zeroshot_templates) + "\n")
    evaluate = [
        sys.executable, "-m", "navit_clip.cli", "eval", str(ckpt),
        "--data", str(ROOT / "demo_data" / "heldout-0000.tar"),
        "--classnames", str(ROOT / "demo_data" / "classnames.txt"),
        "--templates", str(templates), "--budgets", "native,9,16,36,64,144", "--out", str(RUN / "eval"),
    ]  # fmt: skip
    ev = subprocess.run(evaluate, cwd=ROOT, capture_output=True, text=True)
    if ev.returncode:
        sys.exit(f"navit-clip eval failed:\n{ev.stderr[-3000:]}")
    rows = json.loads((RUN / "eval" / "results.json").read_text())["zeroshot"]
    print("accuracy against tokens per image (navit-clip eval, the demo's templates):")
    print(f"{'budget':>8} {'tokens/img':>10} {'top1':>7}")
    for r in rows:
        print(f"{r['budget']:>8} {r['tokens_per_image']:10.1f} {100 * r['top1']:6.1f}%")
    save_results(
        "demo",
        {
            "wall_s": round(wall, 1),
            "top1": top1,
            "top5": top5,
            "budgets": {r["budget"]: {"tokens": r["tokens_per_image"], "top1": r["top1"]} for r in rows},
        },
    )


if __name__ == "__main__":
    main()
