"""Run open_clip's own trainer (`open_clip_train.main`) in this process, on a learning race's clock.

    python bench/openclip_launch.py --config CFG.json --budgets 90,180 --out DIR -- ARGS...

ARGS are open_clip_train.main's own (`--model <CFG's file stem>`, data, optimiser, `--use-naflex`...);
the release on PyPI or, with PYTHONPATH=<open_clip checkout>/src, open_clip main. Three things are
added to the trainer, nothing else of it changes (data loading, workers, model, loss, optimiser, loop):
  - the race's model config (CFG.json) is registered, as a user adds a JSON file to open_clip;
  - the learning-rate schedule is open_clip's warm-up then cosine, with the cosine over the wall-clock
    budget instead of a step count: a step count calibrated exactly to the budget (the race's rule for
    every side), so the peer anneals fully by its last budget, never early, never late;
  - the clock starts when the trainer is called (imports done, as in the race's own process: model
    construction, data loaders, workers and steps count) and stops at the last optimiser step; at each
    budget the weights go to DIR/at_<seconds>s.pt (writing excluded from the clock) with the step count,
    and after the last the process ends.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import open_clip
import open_clip_train.main as trainer
import siglip_shape  # noqa: F401  (registers the SigLIP-shaped race tower with timm)
import torch
from open_clip_train.scheduler import assign_learning_rate
from torch.optim.optimizer import register_optimizer_step_post_hook


class Clock:
    """Training seconds since the trainer was called, less the time spent writing checkpoints."""

    def __init__(self, budgets: list[float], out: Path):
        self.budgets, self.out = list(budgets), out
        self.start = time.perf_counter()
        self.paused = 0.0
        self.steps = 0
        self.model: torch.nn.Module | None = None
        self.counts = {"images": 0, "image_tokens": 0, "token_slots": 0}  # slots: tokens + padding

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def cosine_lr(self, optimizer, base_lr: float, warmup: int, _steps: int):
        def adjust(step: int) -> float:
            if step < warmup:
                lr = base_lr * (step + 1) / warmup
            else:
                lr = 0.5 * (1 + math.cos(math.pi * min(1.0, self.elapsed() / self.budgets[-1]))) * base_lr
            assign_learning_rate(optimizer, lr)
            return lr

        return adjust

    def keep_model(self, create):
        def wrapped(*args, **kwargs):
            out = create(*args, **kwargs)
            if self.model is None:
                self.model = out[0]
                self.model.register_forward_pre_hook(self.count_tokens, with_kwargs=True)
            return out

        return wrapped

    def count_tokens(self, _module, args, kwargs) -> None:
        """Images, image tokens and token slots a training forward sees: a NaFlex batch's patch_valid
        (one image a row, padded to the batch's sequence length), a fixed-size batch's patches."""
        image = kwargs.get("image", args[0] if args else None)
        if isinstance(image, dict) and "patch_valid" in image:
            valid = image["patch_valid"]
            self.counts["images"] += valid.shape[0]
            self.counts["image_tokens"] += int(valid.sum())
            self.counts["token_slots"] += valid.numel()
        elif isinstance(image, torch.Tensor) and image.ndim == 4:
            ph, pw = getattr(getattr(self.model, "visual", None), "patch_size", (16, 16))  # open_clip's ViT
            tokens = image.shape[0] * (image.shape[2] // ph) * (image.shape[3] // pw)
            self.counts["images"] += image.shape[0]
            self.counts["image_tokens"] += tokens
            self.counts["token_slots"] += tokens

    def after_step(self, _optimizer, _args, _kwargs) -> None:
        self.steps += 1
        while self.budgets and self.elapsed() >= self.budgets[0]:
            t0 = time.perf_counter()
            budget = self.budgets.pop(0)
            state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            meta = {"steps": self.steps, "train_s": round(self.elapsed(), 2), **self.counts}
            torch.save({"state_dict": state, **meta}, self.out / f"at_{budget:.0f}s.pt")
            print(f"race clock: {budget:.0f}s budget at step {self.steps} ({meta['train_s']} s)", flush=True)
            self.paused += time.perf_counter() - t0
        if not self.budgets:
            sys.stdout.flush()
            os._exit(0)  # the race ends at its last budget: no end-of-run checkpoint or evaluation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--config", required=True, help="open_clip model config JSON (its stem is the model name)"
    )
    ap.add_argument("--budgets", required=True, help="comma-separated training seconds")
    ap.add_argument("--out", required=True, help="where the weights at each budget go")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="open_clip_train.main's arguments (after --)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    open_clip.add_model_config(args.config)
    train_args = args.args[1:] if args.args[:1] == ["--"] else args.args
    clock = Clock(sorted(float(b) for b in args.budgets.split(",")), out)
    trainer.cosine_lr = clock.cosine_lr
    trainer.create_model_and_transforms = clock.keep_model(trainer.create_model_and_transforms)
    register_optimizer_step_post_hook(clock.after_step)
    (out / "launch.json").write_text(json.dumps({"open_clip": open_clip.__file__, "args": train_args}))
    trainer.main(train_args)
    raise SystemExit(
        f"open_clip_train ended at step {clock.steps} before the race's last budget {clock.budgets}"
    )


if __name__ == "__main__":
    main()
