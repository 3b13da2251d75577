"""Typed run configuration: YAML file + dotted command-line overrides, validated before any work.

    cfg = load_config("configs/demo.yaml", ["train.steps=100", "model.vision.width=256"])

Every field has a default, so a YAML file names only what it changes. Unknown keys and values of
the wrong type are ValueErrors that name the field.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from navit_clip.data.pipeline import DataConfig
from navit_clip.loss import COMM_DTYPES, TOPOLOGIES
from navit_clip.model.clip import ModelConfig
from navit_clip.packing import ResolutionPolicy
from navit_clip.tokenizer import CLEANS


@dataclass
class LossConfig:
    kind: str = "softmax"  # softmax (CLIP) | sigmoid (SigLIP)
    tile_size: int = 1024
    direct_max_slots: int = 2048
    # ring: one ring of all ranks | hierarchical: a ring per node, node blocks between nodes (nodes - 1
    # inter-node hops, not ranks - 1) | auto: hierarchical when the ranks span several nodes
    topology: str = "auto"
    group_size: int = 0  # ranks per node for hierarchical (0: torchrun's LOCAL_WORLD_SIZE)
    comm_dtype: str = "float32"  # float32 (exact) | bf16: text chunks travel in bf16, tiles in float32

    def validate(self) -> None:
        if self.kind not in ("softmax", "sigmoid"):
            raise ValueError(f"loss.kind={self.kind!r} must be 'softmax' or 'sigmoid'")
        if self.tile_size < 1:
            raise ValueError(f"loss.tile_size={self.tile_size} must be positive")
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"loss.topology={self.topology!r} must be one of {TOPOLOGIES}")
        if self.group_size < 0:
            raise ValueError(f"loss.group_size={self.group_size} must be >= 0 (0: LOCAL_WORLD_SIZE)")
        if self.comm_dtype not in COMM_DTYPES:
            raise ValueError(f"loss.comm_dtype={self.comm_dtype!r} must be one of {tuple(COMM_DTYPES)}")


@dataclass
class TokenizerConfig:
    kind: str = "openclip"  # openclip (BPE shipped with open_clip) | sentencepiece | hf
    # sentencepiece .model file, or a local Hugging Face tokenizer folder or tokenizer.json. A checkpoint
    # converted without one has none: the commands that tokenize ask for it (tokenizer.path=...)
    path: str = ""
    context_length: int = 32
    # navit: [bos] ids [eos], padded | hf: the HF tokenizer's own special tokens and padding, as open_clip's
    # HFTokenizer (SigLIP checkpoints)
    layout: str = "navit"
    clean: str = "none"  # none | whitespace | lower | canonicalize (open_clip's cleaning before tokenizing)
    pad_with_eos: bool = False  # a .model file pads with its end-of-text id (big_vision's SigLIP layout)
    source: str = ""  # where a converted checkpoint's tokenizer comes from (e.g. a hub name), for messages

    def validate(self) -> None:
        if self.kind not in ("openclip", "sentencepiece", "hf"):
            raise ValueError(f"tokenizer.kind={self.kind!r} must be openclip, sentencepiece or hf")
        if self.layout not in ("navit", "hf"):
            raise ValueError(f"tokenizer.layout={self.layout!r} must be navit or hf")
        if self.clean not in CLEANS:
            raise ValueError(f"tokenizer.clean={self.clean!r} is not one of {CLEANS}")
        if self.context_length < 2:
            raise ValueError(f"tokenizer.context_length={self.context_length} must be at least 2")


@dataclass
class EvalConfig:
    shards: str = ""  # webdataset with a class-label field (KEY.cls); empty: no zero-shot eval
    classnames: str = ""  # file with one class name per line
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    label_key: str = "cls"
    every: int = 0  # evaluate every K training steps (0: only at the end)
    final: bool = True  # evaluate when training ends (false: no evaluation at the end)
    max_side: int = 512  # native resolution, longer side capped
    tokens: int = 0  # 0: native; N: each image scaled (aspect kept) to the largest size within N patches
    seq_len: int = 0  # 0: data.seq_len (raised to the largest image the policy allows)
    batch_seqs: int = 8

    def validate(self) -> None:
        for name, ok in {
            "every": self.every >= 0,
            "max_side": self.max_side >= 1,
            "tokens": self.tokens >= 0,
            "seq_len": self.seq_len >= 0,
            "batch_seqs": self.batch_seqs >= 1,
        }.items():
            if not ok:
                raise ValueError(f"eval.{name}={getattr(self, name)} is out of range")
        for t in self.templates:
            if "{}" not in t:
                raise ValueError(f"eval.templates entry {t!r} has no '{{}}' for the class name")

    def policy(self) -> ResolutionPolicy:
        """How evaluation sizes each image (`tokens`, else native up to `max_side`)."""
        if self.tokens:
            return ResolutionPolicy("budget", tokens=self.tokens)
        return ResolutionPolicy("native", max_side=self.max_side)


@dataclass
class TrainConfig:
    output_dir: str = "runs/demo"
    steps: int = 1000
    lr: float = 5e-4
    min_lr: float = 0.0
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup: int = 100
    grad_clip: float = 1.0  # 0: no clipping
    accum: int = 1  # gradient accumulation micro-steps per optimizer step
    precision: str = "fp32"  # fp32 | bf16 (autocast) | auto (bf16 where the device has it natively)
    parallel: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard), used under torchrun
    compile: bool = False
    activation_checkpointing: bool = False
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 200
    keep_last: int = 3
    # full: one torch.save file gathered on rank 0 (step_N.pt) | sharded: a torch.distributed.checkpoint
    # folder (step_N/), every rank writing its own shards, loadable on any number of ranks | auto:
    # sharded under FSDP2 on several ranks, full otherwise (docs/training.md, "Checkpoints")
    checkpoint_format: str = "auto"
    async_checkpoint: bool = (
        False  # sharded only: stage the state, write it in the background (dcp.async_save)
    )
    resume: str = ""  # "", "latest", a step_N.pt file or a step_N/ folder
    stop_at: int = (
        0  # stop (after a checkpoint) at this step; the schedule still spans `steps` (0: run to the end)
    )
    max_skipped_steps: int = 5  # stop after this many non-finite steps in a row (updates skipped)
    resume_data: str = "exact"  # exact: replay the data stream to the saved position | fresh: new stream
    device: str = "auto"  # auto | cpu | cuda

    def validate(self) -> None:
        checks = {
            "steps": self.steps >= 1,
            "lr": self.lr > 0,
            "warmup": 0 <= self.warmup,
            "accum": self.accum >= 1,
            "keep_last": self.keep_last >= 1,
            "log_every": self.log_every >= 1,
            "ckpt_every": self.ckpt_every >= 0,
            "max_skipped_steps": self.max_skipped_steps >= 1,
            "min_lr": 0 <= self.min_lr <= self.lr,
            "eps": self.eps > 0,
            "weight_decay": self.weight_decay >= 0,
            "grad_clip": self.grad_clip >= 0,
            "stop_at": self.stop_at >= 0,
            "betas": len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"train.{name}={getattr(self, name)} is out of range")
        choices = {
            "precision": ("fp32", "bf16", "auto"),
            "parallel": ("ddp", "fsdp"),
            "resume_data": ("exact", "fresh"),
            "device": ("auto", "cpu", "cuda"),
            "checkpoint_format": ("auto", "full", "sharded"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"train.{name}={getattr(self, name)!r} must be one of {allowed}")
        if self.async_checkpoint and self.checkpoint_format == "full":
            raise ValueError(
                "train.async_checkpoint=true needs train.checkpoint_format=sharded (or auto under FSDP2): "
                "the full format gathers and writes on rank 0 in the step"
            )

    def resolved_checkpoint_format(self, world_size: int) -> str:
        """`checkpoint_format` with auto decided: sharded under FSDP2 on several ranks, else full (and
        sharded whenever async_checkpoint asks for it)."""
        if self.checkpoint_format != "auto":
            return self.checkpoint_format
        return "sharded" if self.async_checkpoint or (self.parallel == "fsdp" and world_size > 1) else "full"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    demo: bool = False  # generate the demo dataset and point data/eval at it
    demo_root: str = "demo_data"  # where the demo dataset is generated (git-ignored)

    def validate(self) -> None:
        """Check every section and the fields that must agree across sections (in the demo, before
        its data exist: the demo fills an empty data.shards)."""
        self.model.validate()
        self.data.validate(require_shards=not self.demo)
        self.tokenizer.validate()
        self.loss.validate()
        self.train.validate()
        self.eval.validate()
        if self.data.patch_size != self.model.vision.patch_size:
            raise ValueError(
                f"data.patch_size={self.data.patch_size} differs from model.vision.patch_size="
                f"{self.model.vision.patch_size}; the patch size is the model's: set model.vision.patch_size"
            )
        if self.data.normalize != self.model.normalize:
            raise ValueError(
                f"data.normalize={self.data.normalize!r} differs from model.normalize="
                f"{self.model.normalize!r}; the normalisation is the model's: set model.normalize"
            )
        if self.model.text.context_length != self.tokenizer.context_length:
            raise ValueError(
                f"model.text.context_length={self.model.text.context_length} differs from "
                f"tokenizer.context_length={self.tokenizer.context_length}; set them equal"
            )
        if self.loss.kind == "sigmoid" and not self.model.logit_bias:
            raise ValueError("loss.kind='sigmoid' needs model.logit_bias=true")


# -- loading --------------------------------------------------------------------------------------


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        for a in args:
            try:
                return _coerce(value, a, where)
            except ValueError:
                continue
        raise ValueError(f"{where}={value!r} does not fit {tp}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        return (
            list(value) if inner is Any else [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        )
    if tp is Any or tp is dict or origin is dict:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{where}={value!r} must be an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:  # YAML reads 2e-3 (no dot) as a string
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}={value!r} must be a number") from None
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{where}={value!r} must be a string")
    return value


def _build(cls: type, values: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(
            f"unknown config key(s) {sorted(f'{where}.{k}'.lstrip('.') for k in unknown)}; known: {sorted(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}".lstrip(".")) for k, v in values.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted}: {k} is not a section")
    node[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Config from a YAML file (or defaults) with `key.sub=value` overrides (values parsed as YAML)."""
    tree: dict = {}
    if path:
        path = Path(path)
        if not path.exists():
            raise ValueError(f"config file {path} does not exist")
        tree = yaml.safe_load(path.read_text()) or {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ValueError(f"override {item!r}: {raw!r} is not a value (quote it: {key}='{raw}')") from None
        _set_dotted(tree, key.strip(), value)
    for old, new in MOVED.items():
        if _get(tree, old) is not None:
            raise ValueError(f"{'.'.join(old)} is now {'.'.join(new)} ({MOVED_WHY}): rename it")
    tree = with_init_from(tree)
    return _with_derived(_build(Config, tree), tree)


# What a run starting from model.init_from sets itself; the rest of the model is the checkpoint's.
RUN_MODEL_KEYS = {
    "": {"init_from"},
    "vision": {"attn_backend", "lock", "lock_unlocked_groups", "lock_norms"},
    "text": {"lock", "lock_unlocked_groups", "lock_norms"},
}


def with_init_from(tree: dict) -> dict:
    """With model.init_from, the config tree whose model architecture, tokenizer and image
    normalisation (and, unless the run names one, loss kind) are the checkpoint's: the weights only fit the model they were trained (or converted)
    as, and the model only understands the tokens and pixels it was trained on. The run's own choices
    (RUN_MODEL_KEYS: attention backend, locking) stay the config's. Model fields the config states
    differently are replaced, with one warning naming them."""
    path = _get(tree, ("model", "init_from"))
    if not path:
        return tree
    if not Path(path).exists():
        raise ValueError(
            f"model.init_from={path} does not exist (a navit-clip checkpoint file or sharded step folder)"
        )
    import torch  # only here: reading a config file needs no torch

    from navit_clip.checkpoint import read_checkpoint

    if Path(path).is_dir():  # a sharded step folder: its config (read_checkpoint refuses any other)
        state = read_checkpoint(path, parts=())
    else:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if "config" not in state or ("model" not in state and not Path(path).is_dir()):
        raise ValueError(
            f"model.init_from={path} is not a navit-clip checkpoint (no model weights and config); "
            "an open_clip checkpoint converts with `navit-clip convert-openclip MODEL --pretrained FILE OUT`"
        )
    saved = migrate(state["config"])
    tree = copy.deepcopy(tree)
    given = tree.get("model") or {}
    model, replaced = {}, []
    for section in ("", "vision", "text"):
        if section:
            theirs, ours = saved["model"].get(section, {}), given.get(section) or {}
            target = model.setdefault(section, {})
        else:
            theirs, ours, target = saved["model"], given, model
        for key, value in theirs.items():
            if not isinstance(value, dict) and key not in RUN_MODEL_KEYS[section]:
                target[key] = value
        for key, value in ours.items():
            if isinstance(value, dict):
                continue  # a section: its own pass
            if key in RUN_MODEL_KEYS[section] or key not in theirs:  # the run's, or unknown: named later
                target[key] = value
            elif theirs[key] != value:
                replaced.append(
                    f"model.{section + '.' if section else ''}{key}={value!r} (checkpoint: {theirs[key]!r})"
                )
    tree["model"] = model
    # the checkpoint's tokenizer; where the file lies on this machine is the run's to say
    run_path = (tree.get("tokenizer") or {}).get("path")
    tree["tokenizer"] = dict(saved.get("tokenizer", {}))
    if run_path:
        tree["tokenizer"]["path"] = run_path
    # the checkpoint's pixel normalisation (saved as data.normalize before model.normalize existed)
    norm = saved["model"].get("normalize") or saved.get("data", {}).get("normalize", "clip")
    tree["model"]["normalize"] = tree.setdefault("data", {})["normalize"] = norm
    # the objective the checkpoint was trained with (SigLIP's sigmoid), unless the run names one
    if "kind" not in (tree.get("loss") or {}) and "kind" in saved.get("loss", {}):
        tree.setdefault("loss", {})["kind"] = saved["loss"]["kind"]
    if replaced:
        logging.getLogger(__name__).warning(
            "model.init_from=%s: the model is the checkpoint's; these config values are replaced: %s",
            path,
            ", ".join(replaced),
        )
    return tree


def _with_derived(cfg: Config, tree: dict) -> Config:
    """Fill the fields stated elsewhere, where the config does not give them: data.patch_size and
    data.normalize are the model's (a copy may be given: then equal); with rope_mode=cap, model.vision.rope_span is the
    longest image side the training data can have, in patches (`trained_side`)."""
    if _get(tree, ("data", "patch_size")) is None:
        cfg.data.patch_size = cfg.model.vision.patch_size
    # the pixel normalisation is the model's; configs and checkpoints that state it as data.normalize
    # only (before model.normalize existed) give it to the model
    given = _get(tree, ("data", "normalize"))
    if _get(tree, ("model", "normalize")) is None and given is not None:
        cfg.model.normalize = given
    elif given is None:
        cfg.data.normalize = cfg.model.normalize
    v = cfg.model.vision
    if v.rope_mode == "cap" and _get(tree, ("model", "vision", "rope_span")) is None:
        v.rope_span = float(trained_side(cfg.data.resolution, v.patch_size))
    return cfg


def trained_side(policy: ResolutionPolicy, patch_size: int) -> int:
    """The longest side, in patches, of the images `policy` trains on: max_side / patch (side
    sampling, native), or the side of a square at the token budget (a budget share counts both)."""
    budget_side = max(1, math.ceil(math.sqrt(policy.tokens)))
    if policy.kind == "budget":
        return budget_side
    side = max(1, math.ceil(policy.largest_side() / patch_size))
    return max(side, budget_side) if policy.budget_prob else side


# The packed layout (tokens per sequence, images per sequence) is the data's: the tower takes any.
MOVED = {
    ("model", "vision", "seq_len"): ("data", "seq_len"),
    ("model", "vision", "max_images"): ("data", "max_images"),
}
MOVED_WHY = "the packed layout is the data pipeline's; the model takes any"
# Fields added with a default that changes behaviour: the value a config saved before the field existed
# stands for, so an old checkpoint keeps computing what it computed.
SAVED_BEFORE = {("model", "vision", "rope_span"): 0.0, ("model", "vision", "rope_mode"): "span"}


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def migrate(tree: dict) -> dict:
    """A checkpoint's or a run's saved config tree in today's fields: MOVED fields go to their new
    place (where that is not set already), SAVED_BEFORE fills fields the tree predates."""
    tree = copy.deepcopy(tree)
    for old, new in MOVED.items():
        parent = _get(tree, old[:-1])
        if isinstance(parent, dict) and old[-1] in parent:
            value = parent.pop(old[-1])
            tree.setdefault(new[0], {}).setdefault(new[1], value)
    for path, value in SAVED_BEFORE.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node.setdefault(path[-1], value)
    return tree


def saved_config(tree: dict) -> Config:
    """The Config of a checkpoint or a run's config.yaml (see `migrate`)."""
    tree = migrate(tree)
    return _with_derived(_build(Config, tree), tree)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
