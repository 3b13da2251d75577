"""The training loop, top to bottom: build, (resume), step, log, checkpoint, evaluate.

Runs as one process on a CPU or a GPU, or under torchrun (DDP by default, FSDP2 with
train.parallel=fsdp). The contrastive loss covers the global batch of all ranks.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from navit_clip.checkpoint import latest_checkpoint, load_checkpoint, remove_partial, save_checkpoint
from navit_clip.config import Config, to_dict
from navit_clip.data.demo import ZEROSHOT_TEMPLATES, ensure_demo_data
from navit_clip.data.pipeline import PackedImageText, make_loader
from navit_clip.distributed import DistInfo, all_reduce_mean, init_distributed, sum_counts, wrap_model
from navit_clip.loss import ContrastiveLoss
from navit_clip.model.clip import NaViTCLIP
from navit_clip.packing import ResolutionPolicy
from navit_clip.tokenizer import build_tokenizer
from navit_clip.zeroshot import build_classifier, eval_data_config, evaluate_zeroshot, load_names

log = logging.getLogger("navit_clip")
MAX_LOGIT_SCALE = math.log(100)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only: none on biases, norms, position tables, probes, temperature."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "pos_embed" in name or "posemb" in name or "probe" in name or "logit_" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, tc) -> torch.optim.AdamW:
    """AdamW with `param_groups`, fused: one kernel over all parameters instead of a Python loop of
    small ops (on CPU 49 -> 10 ms a step for the race's 14.7M parameters; the same update)."""
    return torch.optim.AdamW(
        param_groups(model, tc.weight_decay), lr=tc.lr, betas=tuple(tc.betas), eps=tc.eps, fused=True
    )


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def prepare_demo(cfg: Config, info: DistInfo) -> None:
    """Point data and eval at the generated demo shards (generated once, by rank 0), where the user
    gave none: a `data.shards` given on the command line is never replaced."""
    if info.is_main:
        ensure_demo_data(cfg.demo_root)
    if info.distributed:
        torch.distributed.barrier()
    paths = ensure_demo_data(cfg.demo_root)  # already complete: returns the paths at once
    if cfg.data.shards and info.is_main:
        log.info("demo: training on the given data.shards; evaluating on the demo's held-out set")
    cfg.data.shards = cfg.data.shards or paths["train"]
    cfg.eval.shards = cfg.eval.shards or paths["heldout"]
    cfg.eval.classnames = cfg.eval.classnames or paths["classnames"]
    if cfg.eval.templates == ["a photo of a {}."]:
        cfg.eval.templates = list(ZEROSHOT_TEMPLATES)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class MetricsLog:
    """metrics.jsonl and TensorBoard scalars, written by rank 0 only.

    A run that starts at step `start` (0, or the resumed checkpoint's) first drops what an earlier
    run logged after that step: metrics.jsonl keeps its rows up to `start`, and TensorBoard hides
    later events (`purge_step`), so both read as one run however often it was killed and resumed.
    """

    def __init__(self, folder: Path, enabled: bool, start: int = 0):
        self.enabled = enabled
        if enabled:
            path = folder / "metrics.jsonl"
            if path.exists():
                kept = [r for r in path.read_text().splitlines() if _row_step(r) <= start]
                path.write_text("".join(r + "\n" for r in kept))
            self.jsonl = open(path, "a")  # noqa: SIM115 - closed in close()
            self.tb = SummaryWriter(str(folder / "tensorboard"), purge_step=start + 1)

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def _row_step(row: str) -> float:
    try:
        return float(json.loads(row).get("step", math.inf))
    except (ValueError, AttributeError):
        return math.inf  # a torn last line from a killed run: dropped


def zero_shot(model, tokenizer, cfg: Config, info: DistInfo) -> dict | None:
    if not cfg.eval.shards or not cfg.eval.classnames:
        return None
    classnames = load_names(cfg.eval.classnames, "classnames")
    model.eval()
    classifier = build_classifier(model, tokenizer, classnames, cfg.eval.templates, info.device)
    policy = ResolutionPolicy("native", max_side=cfg.eval.max_side)
    data_cfg = eval_data_config(
        cfg.data, cfg.eval.shards, cfg.eval.label_key, policy, cfg.eval.seq_len, cfg.eval.batch_seqs
    )
    result = evaluate_zeroshot(model, classifier, data_cfg, info.device, info.rank, info.world_size)
    model.train()
    result["chance"] = 1 / len(classnames)
    return result


def train(cfg: Config) -> dict:
    """Train as configured; returns the final metrics (last losses, zero-shot results)."""
    cfg.validate()  # before any work, the demo's data generation included
    info = init_distributed(cfg.train.device)
    if cfg.demo:
        prepare_demo(cfg, info)
        cfg.validate()
    tc = cfg.train
    out = Path(tc.output_dir)
    torch.manual_seed(tc.seed)  # the same initial weights on every rank
    random.seed(tc.seed)
    tokenizer = build_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path, cfg.tokenizer.context_length)
    cfg.model.text.vocab_size, cfg.model.text.pad_id = tokenizer.num_embeddings, tokenizer.pad_id
    resolved = to_dict(cfg)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    model = NaViTCLIP(cfg.model).to(info.device)
    if tc.activation_checkpointing:
        _checkpoint_blocks(model)
    wrapped = wrap_model(model, info, tc.parallel)
    if tc.compile:
        # The MLPs (most of the FLOPs) are compiled with dynamic shapes; attention stays eager: its
        # packing plan (group sizes, sequence offsets) changes every batch and would recompile.
        for tower in (model.visual, model.text):
            for block in tower.blocks:
                block.mlp.compile(dynamic=True)
    optimizer = make_optimizer(model, tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(tc.warmup, tc.steps, tc.min_lr / tc.lr)
    )
    loss_fn = ContrastiveLoss(
        cfg.loss.kind, tile_size=cfg.loss.tile_size, direct_max_slots=cfg.loss.direct_max_slots
    )

    start, data_batches, skipped, skipped_in_a_row, state = 0, 0, 0, 0, {}
    skip_window, skip_totals = Counter(), Counter()  # data skips by reason, this log window / whole run
    resume_from = (
        latest_checkpoint(out) if tc.resume == "latest" else (Path(tc.resume) if tc.resume else None)
    )
    if tc.resume and resume_from is None:
        log.warning("train.resume=latest but %s holds no checkpoint: starting from scratch", out)
    if resume_from is not None and not resume_from.exists():
        raise ValueError(f"train.resume={tc.resume}: no such checkpoint; give a path or 'latest'")
    if info.is_main:
        remove_partial(out)
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer, scheduler, model_config=resolved["model"])
        start, data_batches, skipped = state["step"], state["data_batches"], state.get("skipped_steps", 0)
        skip_totals.update(state.get("skip_counts", {}))
        set_rng_state(state["rng"])
        if info.is_main:
            log.info("resumed from %s at step %d", resume_from, start)

    data_state = {k: state.get(k, 0) for k in ("data_batches", "data_epoch", "data_origin")} if start else {}
    dataset, batches, replayed = open_data(cfg, tokenizer, info, start, data_state)

    metrics = MetricsLog(out, info.is_main, start)
    autocast = (
        torch.autocast(info.device.type, dtype=torch.bfloat16) if tc.precision == "bf16" else nullcontext()
    )
    history: list[float] = []
    window = {"images": 0, "tokens": 0, "padding": 0.0, "batches": 0, "time": 0.0}
    end = min(tc.stop_at, tc.steps) if tc.stop_at else tc.steps
    bar = tqdm(range(start, end), desc="train", initial=start, total=tc.steps, disable=not info.is_main)
    wrapped.train()
    for step in bar:
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=info.device)
        for micro in range(tc.accum):
            batch = next(batches).to(info.device, non_blocking=True)
            data_batches += 1
            sync = (
                nullcontext()
                if micro == tc.accum - 1 or not hasattr(wrapped, "no_sync")
                else wrapped.no_sync()
            )
            with sync, autocast:
                out_emb = wrapped(batch.images, batch.text)
                loss = loss_fn(
                    out_emb["image_emb"],
                    out_emb["text_emb"],
                    out_emb["valid"],
                    out_emb["logit_scale"],
                    out_emb.get("logit_bias"),
                )
            # read now: under FSDP2 the parameter is only whole (unsharded) inside the step
            scale_seen = out_emb["logit_scale"].detach().exp().reshape(())
            with sync:
                (loss / tc.accum).backward()
            loss_sum += loss.detach() / tc.accum
            window["images"] += batch.stats["images"]
            window["tokens"] += batch.stats["tokens"]
            window["padding"] += batch.stats["padding_fraction"]
            window["batches"] += 1
            skip_window.update(
                {
                    k: v
                    for k, v in batch.stats.items()
                    if (k.startswith("skip_") or k == "corrupt_shard") and v
                }
            )
        grad_norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf")
        )
        # One host-device sync per step: a non-finite loss or gradient skips the update.
        finite = bool(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))
        if finite:
            optimizer.step()
            skipped_in_a_row = 0
        else:
            skipped += 1
            skipped_in_a_row += 1
            log.warning("step %d: non-finite loss or gradient, update skipped (%d so far)", step, skipped)
            if skipped_in_a_row >= tc.max_skipped_steps:
                last = latest_checkpoint(out)
                raise RuntimeError(
                    f"{skipped_in_a_row} steps in a row (to step {step + 1}) had a non-finite loss or "
                    f"gradient (train.max_skipped_steps={tc.max_skipped_steps}); stopped. The last "
                    f"checkpoint ({last or 'none yet'}) holds the last weights written; lower train.lr, "
                    f"set train.grad_clip, or check the data"
                )
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        window["time"] += time.perf_counter() - t0
        history.append(float(loss_sum))

        done = step + 1
        if done % tc.log_every == 0 or done == tc.steps:
            w = all_reduce_mean({k: float(v) for k, v in window.items()}, info)
            scale = info.world_size  # images and tokens summed over ranks
            values = {
                "loss": history[-1],
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "logit_scale": float(scale_seen),
                "images_per_s": scale * w["images"] / max(w["time"], 1e-9),
                "tokens_per_s": scale * w["tokens"] / max(w["time"], 1e-9),
                "padding": w["padding"] / max(w["batches"], 1),
                "skipped_steps": skipped,
            }
            # data skips summed over ranks (and their workers): this window's and the run's so far
            skips = sum_counts(skip_window, info)
            skip_totals.update(skips)
            values.update({f"data/{k}": v for k, v in skips.items()})
            values.update({f"data/{k}_total": v for k, v in skip_totals.items()})
            metrics.write(done, values)
            bar.set_postfix(
                loss=f"{values['loss']:.3f}",
                img_s=f"{values['images_per_s']:.0f}",
                tok_s=f"{values['tokens_per_s']:.0f}",
                pad=f"{100 * values['padding']:.1f}%",
                skipped=sum(skip_totals.values()),
            )
            window = dict.fromkeys(window, 0)
            skip_window.clear()
        if (tc.ckpt_every and done % tc.ckpt_every == 0) or done == end:
            extra = {
                "data_batches": data_batches,
                "data_epoch": dataset.epoch,
                "data_origin": dataset.origin,
                "skipped_steps": skipped,
                "skip_counts": dict(skip_totals + Counter(sum_counts(skip_window, info))),
                "rng": rng_state(),
                "config": resolved,
            }
            save_checkpoint(out, done, model, optimizer, scheduler, extra, tc.keep_last, info.is_main)
        if cfg.eval.every and done % cfg.eval.every == 0 and done != tc.steps:
            result = zero_shot(model, tokenizer, cfg, info)
            if result:
                metrics.write(done, {"zeroshot_top1": result["top1"], "zeroshot_top5": result["top5"]})
    bar.close()

    final = {"losses": history, "skipped_steps": skipped, "steps": end, "replayed_batches": replayed}
    if end < tc.steps:
        metrics.close()
        if info.is_main:
            print(f"stopped at step {end} of {tc.steps}; continue with --resume latest")
        return final
    result = zero_shot(model, tokenizer, cfg, info)
    if result:
        metrics.write(tc.steps, {"zeroshot_top1": result["top1"], "zeroshot_top5": result["top5"]})
        final["zeroshot"] = result
        if info.is_main:
            print(
                f"zero-shot on {int(result['n'])} held-out images: top-1 {100 * result['top1']:.1f}% "
                f"top-5 {100 * result['top5']:.1f}% (chance {100 * result['chance']:.1f}%)"
            )
    metrics.close()
    if info.is_main:
        print(f"run folder: {out} (checkpoints, metrics.jsonl, tensorboard/, config.yaml)")
    return final


def open_data(cfg: Config, tokenizer, info: DistInfo, start: int, saved: dict):
    """The training data stream, positioned for a run at optimiser step `start` (`saved`: the data
    state of its checkpoint) -> (dataset, batches, number of batches replayed).

    Exact resume (`train.resume_data=exact`) restores the stream's epoch and origin and replays at
    most one chunk of resampled data (`data.resume_chunk` batches) or the current epoch of finite
    data: the same batches an unbroken run sees, in seconds whatever the step. `fresh` starts a new
    deterministic stream at once (seeded by the step), not the one an unbroken run would have seen.
    """
    tc = cfg.train
    done = saved.get("data_batches", 0)
    dataset = PackedImageText(cfg.data, tokenizer, info.rank, info.world_size, tc.accum, first_batch=done)
    replay = 0
    if start and tc.resume_data == "fresh":
        dataset.set_epoch(start)
    elif start:
        dataset.set_epoch(saved.get("data_epoch", 0))
        dataset.origin = saved.get("data_origin", 0)
        replay = dataset.resume_at(done)
    batches = endless(make_loader(dataset, pin_memory=info.device.type == "cuda"), dataset, info)
    for _ in tqdm(
        range(replay), desc="replaying data to the checkpoint", disable=not info.is_main or not replay
    ):
        next(batches)
    return dataset, batches, replay


def endless(loader, dataset: PackedImageText, info: DistInfo):
    """Batches forever: resampled data never ends; finite data (data.resampled=false) starts its next
    epoch, reshuffled, when one ends. Deterministic, so resume can replay it."""
    while True:
        count = 0
        for batch in loader:
            count += 1
            yield batch
        dataset.first_batch += count  # schedules continue across epochs; the next epoch starts here
        dataset.origin = dataset.first_batch
        if count == 0:
            raise ValueError(
                f"rank {info.rank} got no batch from data.shards ({dataset.cfg.shards}) in one pass: no "
                f"usable sample in its shards, or fewer shards than ranks x data.num_workers (then give "
                f"more shards, fewer workers, or data.resampled=true)"
            )
        dataset.set_epoch(dataset.epoch + 1)


def _checkpoint_blocks(model: NaViTCLIP) -> None:
    """Activation checkpointing on every transformer block (recompute in backward)."""
    from torch.utils.checkpoint import checkpoint

    for tower in (model.visual, model.text):
        for block in tower.blocks:
            block.forward = _wrap_checkpoint(block.forward, checkpoint)


def _wrap_checkpoint(fn, checkpoint):
    def run(*args):
        return checkpoint(fn, *args, use_reentrant=False)

    return run
