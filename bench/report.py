"""Run every benchmark in turn and write BENCHMARKS.md from their printed output (no hand-typed figures).

python bench/report.py            # all benchmarks (about 10 minutes on 2 cores)
python bench/report.py loader     # only some; the others keep their last recorded section
"""

import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BENCHES = [
    "learning_race",
    "learning_race_digits",
    "finetune_race",
    "demo",
    "packing",
    "vision_tower",
    "loss_memory",
    "loss_scaling",
    "loader",
    "train_throughput",
    "train_throughput_e2e",
    "train_throughput_bf16",
    "profile_step",
    "resume",
]
COMMANDS = {  # sections run with arguments
    "train_throughput_e2e": ["train_throughput.py", "--e2e"],
    "train_throughput_bf16": ["train_throughput.py", "--precision", "bf16"],
    # three seeds a race (~20 min each on 2 cores): one run's 90 s figure spreads by 15 points
    "learning_race": ["learning_race.py", "--seeds", "0,1,2"],
    "learning_race_digits": ["learning_race.py", "--task", "digits", "--seeds", "0,1,2"],
}
NOTES = (ROOT / "bench" / "NOTES.md").read_text() if (ROOT / "bench" / "NOTES.md").exists() else ""


def section(name: str, output: str, seconds: float) -> str:
    return (
        f"<!-- bench:{name} -->\n## {name}\n\n```\n$ python bench/{' '.join(command(name))}\n{output.strip()}\n```\n"
        f"({seconds:.0f} s; figures in `bench/results/{name}.json`)\n<!-- /bench:{name} -->\n"
    )


def command(name: str) -> list[str]:
    return COMMANDS.get(name, [f"{name}.py"])


def main() -> None:
    chosen = sys.argv[1:] or BENCHES
    path = ROOT / "BENCHMARKS.md"
    old = path.read_text() if path.exists() else ""
    sections = {m[1]: m[0] for m in re.finditer(r"<!-- bench:(\w+) -->.*?<!-- /bench:\1 -->\n", old, re.S)}
    for name in chosen:
        t0 = time.perf_counter()
        script, *args = command(name)
        proc = subprocess.run(
            [sys.executable, f"bench/{script}", *args], cwd=ROOT, capture_output=True, text=True
        )
        if proc.returncode:
            sys.exit(f"bench/{name}.py failed:\n{proc.stderr[-3000:]}")
        out = "\n".join(line for line in proc.stdout.splitlines())
        sections[name] = section(name, out, time.perf_counter() - t0)
        print(sections[name])
    machine = (
        f"Machine of the last run: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}, Python {platform.python_version()}, no GPU used."
    )
    body = "\n".join(sections[n] for n in BENCHES if n in sections)
    path.write_text(
        f"# Benchmarks\n\nEvery figure below is the printed output of the command above it, "
        f"pasted by `python bench/report.py`.\n{machine}\n\n{NOTES}\n{body}"
    )


if __name__ == "__main__":
    main()
