"""open_clip's trainers as race peers: `python -m open_clip_train.main` as users run it, in a subprocess.

Two peers, one code path (bench/openclip_launch.py runs the trainer on the race's clock):
  - `openclip_train`: the installed open_clip release's trainer (its webdataset loader, resampled,
    its workers, AdamW, loss and loop), evaluated by the caller with open_clip's own val transform;
  - `naflex`: open_clip main's `--use-naflex` (timm NaFlexViT: one image a row, padded; a sequence length
    sampled per batch from `--naflex-seq-lens`; batches sized to `--naflex-max-tokens-per-batch`), from a
    checkout the bench is pointed at (`--openclip-src DIR`), evaluated in that checkout
    (bench/naflex_eval.py: timm's NaFlex eval transform at each token budget).
The release's trainer needs `webdataset<=0.2.86` and pandas: `pip install -e ".[bench]"`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
NAFLEX_SEQ_LENS = (16, 36, 64, 144, 256)


def trainer_args(
    model: str, data: dict, seed: int, device: torch.device, precision: str, hp: dict, work: Path
) -> list[str]:
    """open_clip_train.main's command line for the race: its data and trainer, the race's settings."""
    return [
        "--model", model,
        "--train-data", data["train"],
        "--dataset-type", "webdataset",
        "--dataset-resampled",
        "--train-num-samples", str(10**6),  # one epoch longer than any race: the clock ends the run
        "--epochs", "1",
        "--batch-size", str(hp["batch"]),
        "--workers", str(hp["workers"]),
        "--lr", str(hp["lr"]),
        "--wd", str(hp["weight_decay"]),
        "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6",
        "--warmup", str(hp["warmup"]),
        *(["--grad-clip-norm", str(hp["grad_clip"])] if hp["grad_clip"] > 0 else []),
        "--precision", "fp32" if precision == "fp32" else "amp_bf16",
        "--device", str(device),
        "--seed", str(seed),
        "--logs", str(work), "--name", "run",
        "--log-every-n-steps", "20",
        "--report-to", "",
    ]  # fmt: skip


def naflex_args(tokens_per_batch: int) -> list[str]:
    """open_clip main's NaFlex training: every evaluated budget is a sampled sequence length."""
    return [
        "--use-naflex",
        "--naflex-seq-lens", *map(str, NAFLEX_SEQ_LENS),
        "--naflex-max-tokens-per-batch", str(tokens_per_batch),
    ]  # fmt: skip


def run_trainer(
    peer: str, model_cfg: dict, data: dict, budgets: list[float], seed: int, device: torch.device,
    precision: str, hp: dict, src: str | None = None, extra: list[str] = (), name: str | None = None,
) -> dict[float, dict]:  # fmt: skip
    """Train `peer` to each budget; {budget: {"state_dict", "steps", "train_s", counts}}. `src`: an
    open_clip checkout; `extra`: more trainer arguments (`--pretrained CKPT` for a fine-tune); `name`:
    its folder under bench/results/peers (default PEER_seedSEED)."""
    work = BENCH / "results" / "peers" / (name or f"{peer}_seed{seed}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    config = work / "race-vit-ti.json"
    config.write_text(json.dumps(model_cfg))
    args = trainer_args(config.stem, data, seed, device, precision, hp, work)
    if peer == "naflex":
        args += naflex_args(hp["tokens_per_batch"])
    args += list(extra)
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(src) / "src"), env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        )
    cmd = [sys.executable, str(BENCH / "openclip_launch.py"), "--config", str(config),
           "--budgets", ",".join(str(b) for b in budgets), "--out", str(work / "weights"), "--", *args]  # fmt: skip
    print(f"  {peer}: python -m open_clip_train.main {' '.join(args)}")
    t0 = time.perf_counter()
    with open(work / "trainer.log", "w") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    text = (work / "trainer.log").read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"{peer} trainer failed (rc {proc.returncode}), last lines:\n" + text[-3000:])
    for line in re.findall(r"race clock: .*", text):
        print(f"  {peer} {line}")
    print(f"  {peer}: trainer process {time.perf_counter() - t0:.0f} s, log in {work / 'trainer.log'}")
    return {b: torch.load(work / "weights" / f"at_{b:.0f}s.pt", weights_only=True) for b in budgets}


def naflex_zeroshot(src: str, model_cfg: dict, weights: dict, data: dict, images: list, tokens) -> dict:
    """Top-1 of the NaFlex peer at each budget in `tokens`, evaluated in open_clip main (a subprocess)."""
    work = BENCH / "results" / "peers" / "naflex_eval"
    work.mkdir(parents=True, exist_ok=True)
    config = work / "race-vit-ti.json"
    config.write_text(json.dumps(model_cfg))
    torch.save(weights, work / "weights.pt")
    spec = {
        "classnames": Path(data["classnames"]).read_text().split(),
        "templates": list(data["templates"]),
        "images": images,
    }
    (work / "eval.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(Path(src) / "src")}
    cmd = [sys.executable, str(BENCH / "naflex_eval.py"), "--config", str(config), "--weights",
           str(work / "weights.pt"), "--eval", str(work / "eval.json"),
           "--tokens", ",".join(map(str, tokens)), "--out", str(work / "result.json")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError("NaFlex evaluation failed:\n" + (proc.stdout + proc.stderr)[-3000:])
    return json.loads((work / "result.json").read_text())


def check_openclip_src(src: str | None) -> str | None:
    """The checkout's path if it holds open_clip main's NaFlex trainer, else None with one line why."""
    if not src:
        print("naflex peer skipped: no --openclip-src DIR (an open_clip main checkout, see bench/NOTES.md)")
        return None
    if not (Path(src) / "src" / "open_clip_train" / "naflex_data.py").exists():
        print(
            f"naflex peer skipped: {src} has no src/open_clip_train/naflex_data.py (open_clip main, 2026-05+)"
        )
        return None
    commit = Path(src) / "COMMIT"  # a `git archive` export keeps its commit here; a clone has git
    found = subprocess.run(["git", "-C", src, "rev-parse", "HEAD"], capture_output=True, text=True)
    rev = (
        found.stdout.strip()
        if found.returncode == 0
        else (commit.read_text().strip() if commit.exists() else "?")
    )
    print(f"naflex peer: open_clip main from {src}, commit {rev}")
    return src
