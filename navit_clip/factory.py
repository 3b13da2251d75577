"""open_clip-style entry points: build a model, its preprocessing and its tokenizer from a config
or a checkpoint.

    model, preprocess_train, preprocess_val = create_model_and_transforms("runs/demo/step_00000300.pt")
    tokenizer = get_tokenizer("runs/demo/step_00000300.pt")
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from navit_clip.checkpoint import read_checkpoint
from navit_clip.config import Config, load_config, saved_config
from navit_clip.data.pipeline import make_preprocess
from navit_clip.model.clip import NaViTCLIP
from navit_clip.packing import ResolutionPolicy
from navit_clip.tokenizer import tokenizer_for


def config_of(source: str | Path | Config) -> Config:
    """A Config from a Config, a YAML file, or a checkpoint (its embedded config, else the run's config.yaml)."""
    if isinstance(source, Config):
        return source
    path = Path(source)
    if path.suffix in (".yaml", ".yml"):
        return load_config(path)
    if not path.exists():
        raise ValueError(f"{path} is neither a config file nor a checkpoint")
    state = (
        read_checkpoint(path, parts=()) if path.is_dir() else torch.load(path, weights_only=True, mmap=True)
    )
    if "config" in state:
        return saved_config(state["config"])
    run_cfg = path.parent / "config.yaml"
    if not run_cfg.exists():
        raise ValueError(f"checkpoint {path} carries no config and there is no {run_cfg}")
    return saved_config(yaml.safe_load(run_cfg.read_text()))


def _is_checkpoint(source: str | Path | Config) -> bool:
    return not isinstance(source, Config) and Path(source).suffix not in (".yaml", ".yml")


def get_tokenizer(source: str | Path | Config, path: str | Path | None = None):
    """The tokenizer of a config or checkpoint; `path` says where its file lies on this machine (a
    checkpoint converted without one names none)."""
    cfg = config_of(source)
    if path:
        cfg.tokenizer.path = str(path)
    return tokenizer_for(cfg, fixed_vocab=_is_checkpoint(source))


def create_model(source: str | Path | Config, device: str | torch.device = "cpu") -> NaViTCLIP:
    """The model of a config (fresh weights) or of a checkpoint (its weights, its saved vocabulary:
    no tokenizer needed), in eval mode."""
    cfg = config_of(source)
    if not _is_checkpoint(source):
        tokenizer_for(cfg)
    model = NaViTCLIP(cfg.model)
    if _is_checkpoint(source):
        model.load_state_dict(read_checkpoint(source)["model"])
    return model.to(device).eval()


def create_model_and_transforms(
    source: str | Path | Config,
    device: str | torch.device = "cpu",
    eval_tokens: int = 256,
    eval_max_side: int | None = None,
):
    """(model, preprocess_train, preprocess_val): the transforms turn a PIL image into [3, H, W].

    preprocess_train samples sizes like the training pipeline. preprocess_val resizes every image to
    the largest size with its aspect ratio that fits `eval_tokens` patches (default 256), exactly as
    the exported NaViTProcessor does by default, so one photo gets one embedding either way; with
    `eval_max_side` it keeps the native size instead, the longer side capped there.
    """
    cfg = config_of(source)
    model = create_model(cfg if isinstance(source, Config) else source, device)
    v = cfg.model.vision
    train_tf = make_preprocess(cfg.data.resolution, v.patch_size, cfg.data.seq_len, cfg.model.normalize)
    policy = (
        ResolutionPolicy("native", max_side=eval_max_side)
        if eval_max_side
        else ResolutionPolicy("budget", tokens=eval_tokens)
    )
    val_tf = make_preprocess(policy, v.patch_size, 1 << 20, cfg.model.normalize)
    return model, train_tf, val_tf
