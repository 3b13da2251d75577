"""The training loop, in named parts: build, resume, (data), step, log, checkpoint, evaluate.

`train(cfg)` reads top to bottom: `build` makes the run (tokenizer, model, `parallelize`, optimiser,
schedule, loss), `resume` restores a checkpoint into it and returns the `TrainState`, `open_data`
positions the data stream, and each step is `train_step`, then `log_window`, `checkpoint` and
`evaluate` when due. Runs as one process on a CPU or a GPU, or under torchrun (DDP by default, FSDP2
with train.parallel=fsdp). The contrastive loss covers the global batch of all ranks.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from navit_clip.checkpoint import (
    ShardedCheckpointer,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    remove_partial,
    save_checkpoint,
)
from navit_clip.config import Config, to_dict
from navit_clip.data.consumed import ConsumedSamples, EpochRecord
from navit_clip.data.demo import TASKS, ensure_demo_data
from navit_clip.data.pipeline import PackedImageText, make_loader
from navit_clip.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_mean,
    init_distributed,
    parallelize,
    sum_counts,
)
from navit_clip.loss import ContrastiveLoss
from navit_clip.model.clip import NaViTCLIP
from navit_clip.tokenizer import tokenizer_for
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


def resolve_precision(precision: str, device: torch.device) -> str:
    """`train.precision=auto`: bf16 autocast where the device multiplies bf16 natively (CUDA with
    bf16; a CPU with AMX tiles, where the race's step takes ~250 instead of ~330 ms, bench/NOTES.md),
    float32 elsewhere (a CPU without AMX would emulate bf16 and run slower)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, hence the guard
    return "bf16" if device.type == "cpu" and amx is not None and amx() else "fp32"


def autocast_for(precision: str, device: torch.device):
    """The context a step's forward runs in: bf16 autocast, or nothing (float32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


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
    gave no data.shards. With the user's own data.shards nothing is replaced: evaluation runs on what
    the user names (eval.shards) or is skipped with one line saying how to add it."""
    if info.is_main:
        ensure_demo_data(cfg.demo_root)
    if info.distributed:
        torch.distributed.barrier()
    paths = ensure_demo_data(cfg.demo_root)  # already complete: returns the paths at once
    if cfg.data.shards:  # the user's data: the demo's glyphs would measure nothing about it
        if not cfg.eval.shards and info.is_main:
            log.warning(
                "zero-shot evaluation skipped: data.shards is your data; name labelled held-out data "
                "with eval.shards=SHARDS eval.classnames=FILE (or run `navit-clip eval CKPT --data FOLDER`)"
            )
        return
    cfg.data.shards = paths["train"]
    cfg.eval.shards = cfg.eval.shards or paths["heldout"]
    cfg.eval.classnames = cfg.eval.classnames or paths["classnames"]
    if cfg.eval.templates == ["a photo of a {}."]:
        cfg.eval.templates = list(TASKS["glyphs"].zeroshot_templates)


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
    data_cfg = eval_data_config(
        cfg.data,
        cfg.eval.shards,
        cfg.eval.label_key,
        cfg.eval.policy(),
        cfg.eval.seq_len,
        cfg.eval.batch_seqs,
    )
    result = evaluate_zeroshot(model, classifier, data_cfg, info.device, info.rank, info.world_size)
    model.train()
    result["chance"] = 1 / len(classnames)
    return result


# -- the run's parts --------------------------------------------------------------------------


@dataclass
class Run:
    """What a training run is made of, built once by `build`."""

    cfg: Config
    info: DistInfo
    out: Path
    resolved: dict  # the config as it ran (saved as config.yaml and in every checkpoint)
    tokenizer: object
    model: NaViTCLIP
    wrapped: torch.nn.Module  # the model under DDP / FSDP2 (the model itself in one process)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loss_fn: ContrastiveLoss
    autocast: object
    sharded: ShardedCheckpointer | None = None  # train.checkpoint_format=sharded's writer, else None


@dataclass
class TrainState:
    """What a resume restores besides weights, optimiser, scheduler and RNG (lingua's TrainState)."""

    step: int = 0
    data_batches: int = 0  # batches this rank has consumed over the whole run
    skipped_steps: int = 0  # non-finite steps (update skipped), in all
    skipped_in_a_row: int = 0  # not saved: a resumed run starts counting again
    skip_counts: Counter = field(default_factory=Counter)  # data skips by reason, whole run


@dataclass
class Window:
    """Throughput and data-skip counts since the last log line (this rank)."""

    images: int = 0
    tokens: int = 0
    padding: float = 0.0
    batches: int = 0
    time: float = 0.0
    skips: Counter = field(default_factory=Counter)

    def add(self, stats: dict) -> None:
        self.images += stats["images"]
        self.tokens += stats["tokens"]
        self.padding += stats["padding_fraction"]
        self.batches += 1
        self.skips.update(
            {k: v for k, v in stats.items() if (k.startswith("skip_") or k == "corrupt_shard") and v}
        )


def resolve(cfg: Config, info: DistInfo):
    """The final config, validated before any work and not changed after: the demo's data paths,
    the tokenizer's vocabulary size and pad id, and `precision: auto` are filled in here, and nowhere
    else. Returns the tokenizer. `config.yaml` records exactly this config."""
    cfg.validate()  # before any work, the demo's data generation included
    if cfg.demo:
        prepare_demo(cfg, info)
    tokenizer = tokenizer_for(cfg, fixed_vocab=bool(cfg.model.init_from))
    cfg.train.precision = resolve_precision(cfg.train.precision, info.device)
    cfg.validate()
    return tokenizer


def build(cfg: Config, info: DistInfo, tokenizer) -> Run:
    """Model, parallel wrapper, optimiser, schedule and loss for a resolved config; writes config.yaml."""
    tc = cfg.train
    out = Path(tc.output_dir)
    torch.manual_seed(tc.seed)  # the same initial weights on every rank
    random.seed(tc.seed)
    resolved = to_dict(cfg)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        remove_partial(out)
    model = NaViTCLIP(cfg.model)
    if cfg.model.init_from:  # a resume (below) then replaces these weights with the checkpoint's
        load_weights(cfg.model.init_from, model)
    frozen = model.lock_towers()  # before the optimiser: frozen parameters get no state
    if info.is_main and (cfg.model.init_from or frozen):
        n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        log.info(
            "model from %s; %d of %d parameters frozen (%d tensors)",
            cfg.model.init_from or "fresh weights",
            n_frozen,
            sum(p.numel() for p in model.parameters()),
            len(frozen),
        )
    model = model.to(info.device)
    wrapped = parallelize(model, tc, info)
    optimizer = make_optimizer(model, tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(tc.warmup, tc.steps, tc.min_lr / tc.lr)
    )
    lc = cfg.loss
    loss_fn = ContrastiveLoss(
        lc.kind,
        tile_size=lc.tile_size,
        direct_max_slots=lc.direct_max_slots,
        topology=lc.topology,
        group_size=lc.group_size,
        comm_dtype=lc.comm_dtype,
    )
    autocast = autocast_for(tc.precision, info.device)
    fmt = tc.resolved_checkpoint_format(info.world_size)
    sharded = ShardedCheckpointer(out, tc.keep_last, tc.async_checkpoint) if fmt == "sharded" else None
    return Run(
        cfg, info, out, resolved, tokenizer, model, wrapped, optimizer, scheduler, loss_fn, autocast, sharded
    )


def resume(run: Run) -> tuple[TrainState, dict]:
    """Restore the newest (or the named) checkpoint, if asked: (train state, the data stream's state)."""
    tc, out = run.cfg.train, run.out
    path = latest_checkpoint(out) if tc.resume == "latest" else (Path(tc.resume) if tc.resume else None)
    if tc.resume and path is None:
        log.warning("train.resume=latest but %s holds no checkpoint: starting from scratch", out)
    if path is None:
        return TrainState(), {}
    if not path.exists():
        raise ValueError(f"train.resume={tc.resume}: no such checkpoint; give a path or 'latest'")
    saved = load_checkpoint(path, run.model, run.optimizer, run.scheduler, model_config=run.resolved["model"])
    set_rng_state(saved["rng"])
    if run.info.is_main:
        log.info("resumed from %s at step %d", path, saved["step"])
    state = TrainState(
        step=saved["step"],
        data_batches=saved["data_batches"],
        skipped_steps=saved.get("skipped_steps", 0),
        skip_counts=Counter(saved.get("skip_counts", {})),
    )
    data = {k: saved.get(k, 0) for k in ("data_batches", "data_epoch", "data_origin")}
    data |= {k: saved[k] for k in ("data_consumed", "data_skip") if k in saved}  # finite data
    # a checkpoint from before the world size was saved: written by this run's world, as was required
    return state, {**data, "world_size": saved.get("world_size", run.info.world_size)}


def train_step(run: Run, batches, state: TrainState, window: Window) -> dict:
    """One optimiser step over `train.accum` micro-batches; a non-finite loss or gradient skips the
    update, and `train.max_skipped_steps` of those in a row stop the run."""
    tc, info, wrapped = run.cfg.train, run.info, run.wrapped
    t0 = time.perf_counter()
    run.optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=info.device)
    for micro in range(tc.accum):
        batch = next(batches).to(info.device, non_blocking=True)
        state.data_batches += 1
        last = micro == tc.accum - 1 or not hasattr(wrapped, "no_sync")
        sync = nullcontext() if last else wrapped.no_sync()
        with sync, run.autocast:
            emb = wrapped(batch.images, batch.text)
            loss = run.loss_fn(
                emb["image_emb"], emb["text_emb"], emb["valid"], emb["logit_scale"], emb.get("logit_bias")
            )
        # read now: under FSDP2 the parameter is only whole (unsharded) inside the step
        scale_seen = emb["logit_scale"].detach().exp().reshape(())
        with sync:
            (loss / tc.accum).backward()
        loss_sum += loss.detach() / tc.accum
        window.add(batch.stats)
    grad_norm = torch.nn.utils.clip_grad_norm_(
        run.model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf")
    )
    # One host-device sync per step: a non-finite loss or gradient skips the update.
    if bool(torch.isfinite(loss_sum) & torch.isfinite(grad_norm)):
        run.optimizer.step()
        state.skipped_in_a_row = 0
    else:
        _skip_update(run, state)
    run.scheduler.step()
    with torch.no_grad():
        run.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    state.step += 1
    window.time += time.perf_counter() - t0
    return {"loss": float(loss_sum), "grad_norm": float(grad_norm), "logit_scale": float(scale_seen)}


def _skip_update(run: Run, state: TrainState) -> None:
    tc = run.cfg.train
    state.skipped_steps += 1
    state.skipped_in_a_row += 1
    log.warning(
        "step %d: non-finite loss or gradient, update skipped (%d so far)", state.step, state.skipped_steps
    )
    if state.skipped_in_a_row >= tc.max_skipped_steps:
        raise RuntimeError(
            f"{state.skipped_in_a_row} steps in a row (to step {state.step + 1}) had a non-finite loss or "
            f"gradient (train.max_skipped_steps={tc.max_skipped_steps}); stopped. The last checkpoint "
            f"({latest_checkpoint(run.out) or 'none yet'}) holds the last weights written; lower "
            f"train.lr, set train.grad_clip, or check the data"
        )


def log_window(run: Run, state: TrainState, window: Window, last: dict, metrics: MetricsLog, bar) -> None:
    """Write the window's metrics (throughput and data skips summed over ranks) and the progress bar."""
    info = run.info
    w = all_reduce_mean(
        {k: float(getattr(window, k)) for k in ("images", "tokens", "padding", "batches", "time")}, info
    )
    values = {
        **last,
        "lr": run.scheduler.get_last_lr()[0],
        # images and tokens summed over ranks
        "images_per_s": info.world_size * w["images"] / max(w["time"], 1e-9),
        "tokens_per_s": info.world_size * w["tokens"] / max(w["time"], 1e-9),
        "padding": w["padding"] / max(w["batches"], 1),
        "skipped_steps": state.skipped_steps,
    }
    # data skips summed over ranks (and their workers): this window's and the run's so far
    skips = sum_counts(window.skips, info)
    new_reasons = sorted(k for k in skips if k not in state.skip_counts)
    state.skip_counts.update(skips)
    if new_reasons and info.is_main:  # once per reason; the counts go on in metrics.jsonl
        log.warning(
            "step %d: skipping bad samples (%s); counted as data/<reason> in metrics.jsonl",
            state.step,
            ", ".join(f"{k} {skips[k]}" for k in new_reasons),
        )
    values.update({f"data/{k}": v for k, v in skips.items()})
    values.update({f"data/{k}_total": v for k, v in state.skip_counts.items()})
    metrics.write(state.step, values)
    bar.set_postfix(
        loss=f"{values['loss']:.3f}",
        img_s=f"{values['images_per_s']:.0f}",
        tok_s=f"{values['tokens_per_s']:.0f}",
        pad=f"{100 * values['padding']:.1f}%",
        skipped=sum(state.skip_counts.values()),
    )


def checkpoint(run: Run, state: TrainState, dataset: PackedImageText, window: Window) -> None:
    """Save everything a resume needs (a collective: every rank calls it), in the run's format."""
    own = {  # this rank's: its RNG and where its data stream stands
        "data_batches": state.data_batches,
        "data_epoch": dataset.epoch,
        "data_origin": dataset.origin,
        "rng": rng_state(),
    }
    shared = {
        "skipped_steps": state.skipped_steps,
        "skip_counts": dict(state.skip_counts + Counter(sum_counts(window.skips, run.info))),
        "config": run.resolved,
    }
    if not run.cfg.data.resampled:  # finite data: every rank's consumed samples, for another world
        merged = EpochRecord.merged(all_gather_objects((dataset.epoch, dataset.record.state()), run.info))
        dataset.record.drop_before(merged["epoch"])  # every rank has read those epochs whole
        shared["data_consumed"] = merged
        shared["data_skip"] = {e: c.state() for e, c in dataset.consumed.items() if e >= merged["epoch"]}
    tc = run.cfg.train
    if run.sharded is not None:
        shared |= {"scheduler": run.scheduler.state_dict(), "step": state.step}
        run.sharded.save(state.step, run.model, run.optimizer, shared, own)
        return
    extra = {**own, **shared, "world_size": run.info.world_size}
    save_checkpoint(
        run.out, state.step, run.model, run.optimizer, run.scheduler, extra, tc.keep_last, run.info.is_main
    )


def evaluate(run: Run, metrics: MetricsLog, step: int) -> dict | None:
    """Zero-shot top-1 / top-5 on the configured held-out set (all ranks), logged at `step`."""
    result = zero_shot(run.model, run.tokenizer, run.cfg, run.info)
    if result and not result["n"]:
        log.warning(
            "zero-shot: no labelled image read from eval.shards=%s; nothing logged", run.cfg.eval.shards
        )
        return None
    if result:
        metrics.write(step, {"zeroshot_top1": result["top1"], "zeroshot_top5": result["top5"]})
    return result


def train(cfg: Config) -> dict:
    """Train as configured; returns the final metrics (losses, skipped steps, zero-shot results)."""
    cfg.validate()  # a config error is reported before processes and devices are set up
    info = init_distributed(cfg.train.device)
    tokenizer = resolve(cfg, info)
    tc = cfg.train
    run = build(cfg, info, tokenizer)
    state, data_state = resume(run)
    dataset, batches, replayed = open_data(cfg, run.tokenizer, info, state.step, data_state)
    metrics = MetricsLog(run.out, info.is_main, state.step)
    end = min(tc.stop_at, tc.steps) if tc.stop_at else tc.steps
    bar = tqdm(
        range(state.step, end), desc="train", initial=state.step, total=tc.steps, disable=not info.is_main
    )
    history, window = [], Window()
    run.wrapped.train()
    with logging_redirect_tqdm():  # log lines print above the progress bar, not through it
        for _ in bar:
            if run.sharded is not None and run.sharded.failed():
                run.sharded.wait()  # raises CheckpointWriteError naming the folder: stop now
            last = train_step(run, batches, state, window)
            history.append(last["loss"])
            done = state.step
            if done % tc.log_every == 0 or done == tc.steps:
                log_window(run, state, window, last, metrics, bar)
                window = Window()
            if (tc.ckpt_every and done % tc.ckpt_every == 0) or done == end:
                checkpoint(run, state, dataset, window)
            if cfg.eval.every and done % cfg.eval.every == 0 and done != tc.steps:
                evaluate(run, metrics, done)
    bar.close()
    if run.sharded is not None:
        run.sharded.wait()  # the last background write is on disk (or its error raised) before the end

    final = {
        "losses": history,
        "skipped_steps": state.skipped_steps,
        "steps": end,
        "replayed_batches": replayed,
        "data_skips": dict(state.skip_counts),
    }
    if end < tc.steps:
        if info.is_main:
            print(f"stopped at step {end} of {tc.steps}; continue with --resume latest")
    elif cfg.eval.final and (result := evaluate(run, metrics, tc.steps)):
        final["zeroshot"] = result
        if info.is_main:
            print(
                f"zero-shot on {int(result['n'])} held-out images: top-1 {100 * result['top1']:.1f}% "
                f"top-5 {100 * result['top5']:.1f}% (chance {100 * result['chance']:.1f}%)"
            )
    metrics.close()
    if info.is_main and state.skip_counts:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(state.skip_counts.items()))
        print(f"skipped {sum(state.skip_counts.values())} bad samples over the run ({reasons})")
    if info.is_main and end == tc.steps:
        print(f"run folder: {run.out} (checkpoints, metrics.jsonl, tensorboard/, config.yaml)")
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
    # finite data: what the trainer took of each epoch (checkpointed), and what the stream leaves out
    dataset.record = EpochRecord.from_state(saved.get("data_consumed", {}).get("consumed"))
    dataset.consumed = {int(e): ConsumedSamples(r) for e, r in saved.get("data_skip", {}).items()}
    replay = 0
    if start and tc.resume_data == "fresh":
        dataset.set_epoch(start)
    elif start and not cfg.data.resampled and saved.get("world_size", info.world_size) != info.world_size:
        # finite data is split across ranks by shard, so another world splits it otherwise: every
        # rank's stream reads the rest of each epoch, leaving out what any old rank consumed
        dataset.origin = dataset.first_batch = done
        if "data_consumed" in saved:
            dataset.set_epoch(saved["data_consumed"]["epoch"])
            dataset.consumed = {e: ConsumedSamples(c.state()) for e, c in dataset.record.epochs.items()}
            if info.is_main:
                log.info(
                    "resuming finite data (data.resampled=false) on %d ranks from a checkpoint of %d: "
                    "epoch %d goes on without the %d samples consumed of it (docs/training.md, resharding)",
                    info.world_size,
                    saved["world_size"],
                    dataset.epoch,
                    len(dataset.consumed.get(dataset.epoch, ())),
                )
        else:  # a checkpoint from before consumed samples were saved: the next epoch begins
            dataset.set_epoch(saved.get("data_epoch", 0) + 1)
            if info.is_main:
                log.warning(
                    "resuming finite data on %d ranks from a checkpoint of %d that names no consumed "
                    "samples: the rest of epoch %d is skipped, epoch %d begins",
                    info.world_size,
                    saved["world_size"],
                    saved.get("data_epoch", 0),
                    dataset.epoch,
                )
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
    finite = not dataset.cfg.resampled
    while True:
        count = 0
        for batch in loader:
            count += 1
            if finite:  # taken by the trainer now (not prefetched): a checkpoint names it consumed
                dataset.record.record(dataset.epoch, batch.ids)
            yield batch
        dataset.first_batch += count  # schedules continue across epochs; the next epoch starts here
        dataset.origin = dataset.first_batch
        if count == 0 and not dataset.consumed.get(dataset.epoch):  # (not a pass the old ranks read)
            raise ValueError(
                f"rank {info.rank} got no batch from data.shards ({dataset.cfg.shards}) in one pass: no "
                f"usable sample in its shards, or fewer shards than ranks x data.num_workers (then give "
                f"more shards, fewer workers, or data.resampled=true)"
            )
        dataset.set_epoch(dataset.epoch + 1)
