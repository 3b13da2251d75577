"""Training system: distributed equivalence (DDP, FSDP2), exact resume, atomic checkpoints, config."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from dist_utils import run_world

from navit_clip.checkpoint import atomic_save, latest_checkpoint, list_checkpoints, read_checkpoint
from navit_clip.config import load_config, to_dict
from navit_clip.distributed import DistInfo, wrap_model
from navit_clip.loss import ContrastiveLoss
from navit_clip.model.clip import ModelConfig, NaViTCLIP
from navit_clip.model.text import TextConfig
from navit_clip.model.vision import VisionConfig
from navit_clip.packing import build_packed_batch, first_fit, patchify

P, K = 8, 6


def tiny_model() -> NaViTCLIP:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vision=VisionConfig(patch_size=P, width=32, depth=2, heads=4, attn_backend="grouped"),
        text=TextConfig(vocab_size=50, pad_id=0, context_length=K, width=32, depth=2, heads=4),
        embed_dim=16,
    )
    return NaViTCLIP(cfg)


def batch_for(seed: int, num_seqs: int = 2):
    """A packed batch (images of mixed sizes) with token ids for every slot."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(16, 24), (8, 8), (24, 8), (16, 16), (8, 32), (32, 8), (8, 16)]
    imgs = [torch.rand(3, h, w, generator=g) for h, w in sizes]
    cut = [patchify(im, P) for im in imgs]
    bins, left = first_fit([p.shape[0] for p, _ in cut], 32, 4, num_seqs=num_seqs)
    assert not left
    images = build_packed_batch([p for p, _ in cut], [c for _, c in cut], bins, 32, 4, num_seqs=num_seqs)
    text = torch.randint(1, 50, (num_seqs, 4, K), generator=g)
    text[..., -2:] = 0  # padding at the end of every caption
    return images, text


def concat(a, b):
    (ia, ta), (ib, tb) = a, b
    fields = {
        f: torch.cat([getattr(ia, f), getattr(ib, f)])
        for f in ("patches", "coords", "grid", "segment_ids", "slot_valid", "slot_example")
    }
    return type(ia)(**fields), torch.cat([ta, tb])


def one_step(model, wrapped, images, text, group=None):
    loss_fn = ContrastiveLoss("softmax", tile_size=4, group=group)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    out = wrapped(images, text)
    loss = loss_fn(out["image_emb"], out["text_emb"], out["valid"], out["logit_scale"])
    loss.backward()
    opt.step()
    return loss.detach()


def _full_params(model):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _rank_step(rank, world, parallel):
    import torch.distributed as dist

    alone = [dist.new_group([r]) for r in range(world)][rank]  # the reference: one process, its own group
    ref = tiny_model()
    ref_loss = one_step(ref, ref, *concat(batch_for(0), batch_for(1)), group=alone)
    model = tiny_model()
    wrapped = wrap_model(model, DistInfo(rank, world, 0, torch.device("cpu")), parallel)
    loss = one_step(model, wrapped, *batch_for(rank))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    got = _full_params(model)
    if rank == 0:
        for name, p in ref.state_dict().items():
            # within 1e-5, relative for parameters larger than 1 (a key-norm bias has zero gradient
            # in exact arithmetic, so its update is rounding noise around 0)
            err = (got[name] - p).abs().max() / p.abs().max().clamp(min=1.0)
            assert err < 1e-5, (parallel, name, float(err))
        # and the step did change the weights
        assert any((got[n] - p).abs().max() > 1e-4 for n, p in tiny_model().state_dict().items())


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_one_step_on_two_ranks_equals_one_process_on_the_whole_batch(parallel):
    run_world(2, _rank_step, parallel)


def tiny_run(shards: str, out, **extra) -> list[str]:
    base = {
        "demo": False,
        "data.shards": shards,
        "eval.shards": "''",
        "train.output_dir": str(out),
        "model.vision.width": 32,
        "model.vision.depth": 1,
        "model.vision.heads": 2,
        "model.text.width": 32,
        "model.text.depth": 1,
        "model.text.heads": 2,
        "model.embed_dim": 16,
        "data.batch_seqs": 2,
        "data.num_workers": 0,
        "data.shuffle_buffer": 20,
        "train.steps": 6,
        "train.warmup": 2,
        "train.ckpt_every": 3,
        "train.log_every": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def test_resume_continues_exactly(small_shards, tmp_path):
    from navit_clip.train import train

    shards = small_shards["train"]
    full = train(load_config("configs/demo.yaml", tiny_run(shards, tmp_path / "a")))
    first = train(load_config("configs/demo.yaml", tiny_run(shards, tmp_path / "b", **{"train.stop_at": 3})))
    assert first["steps"] == 3 and len(first["losses"]) == 3
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step_00000003.pt"]
    second = train(
        load_config("configs/demo.yaml", tiny_run(shards, tmp_path / "b", **{"train.resume": "latest"}))
    )
    assert len(full["losses"]) == 6 and len(second["losses"]) == 3
    torch.testing.assert_close(
        torch.tensor(first["losses"] + second["losses"]), torch.tensor(full["losses"]), rtol=1e-6, atol=0
    )
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 6
    # resume_data=fresh: a new deterministic stream from the checkpoint on, remembered for later resumes
    first_c = train(
        load_config("configs/demo.yaml", tiny_run(shards, tmp_path / "c", **{"train.stop_at": 3}))
    )
    fresh = train(
        load_config(
            "configs/demo.yaml",
            tiny_run(shards, tmp_path / "c", **{"train.resume": "latest", "train.resume_data": "fresh"}),
        )
    )
    assert first_c["losses"] == first["losses"] and len(fresh["losses"]) == 3
    assert fresh["losses"] != second["losses"]
    assert torch.load(tmp_path / "c" / "step_00000006.pt", weights_only=True)["data_epoch"] == 3
    with pytest.raises(ValueError, match="no such checkpoint"):
        train(
            load_config(
                "configs/demo.yaml",
                tiny_run(shards, tmp_path / "d", **{"train.resume": str(tmp_path / "nope.pt")}),
            )
        )
    assert (tmp_path / "b" / "tensorboard").is_dir()
    # config.yaml is the resolved config that ran (tokenizer fields filled in), and loads back to itself
    saved = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    assert saved["model"]["text"]["vocab_size"] == 49408 and saved["data"]["shards"] == shards
    assert yaml.safe_load(yaml.safe_dump(to_dict(load_config(str(tmp_path / "b" / "config.yaml"))))) == saved


KILLER = textwrap.dedent("""
    import os, signal, sys, torch
    from pathlib import Path
    from navit_clip.checkpoint import atomic_save, checkpoint_path
    folder = Path(sys.argv[1])
    atomic_save({"step": 1, "w": torch.ones(10)}, checkpoint_path(folder, 1))
    real_save = torch.save
    def dying_save(obj, f, *a, **k):
        f.write(b"half of a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save = dying_save
    atomic_save({"step": 2, "w": torch.zeros(10)}, checkpoint_path(folder, 2))
""")


def test_killed_while_writing_never_leaves_a_loadable_half_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, "-c", KILLER, str(tmp_path)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001.pt", "step_00000002.pt.tmp"]
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step_00000001.pt"
    assert torch.load(latest, weights_only=True)["step"] == 1


def test_atomic_save_replaces_and_keeps_nothing_temporary(tmp_path):
    path = tmp_path / "step_00000005.pt"
    atomic_save({"a": torch.arange(3)}, path)
    atomic_save({"a": torch.arange(4)}, path)
    assert os.listdir(tmp_path) == ["step_00000005.pt"]
    assert torch.load(path, weights_only=True)["a"].tolist() == [0, 1, 2, 3]


def test_config_overrides_and_errors():
    def demo_cfg(*overrides):
        return load_config("configs/demo.yaml", ["demo=false", "data.shards=x.tar", *overrides])

    cfg = demo_cfg("train.steps=7", "model.vision.width=64", "data.token_drop.rate=0.1")
    cfg.validate()
    assert cfg.train.steps == 7 and cfg.model.vision.width == 64 and cfg.data.token_drop.rate == 0.1
    # stated once: the packed layout in data, the patch size in the model (the pipeline reads it there)
    assert (cfg.data.seq_len, cfg.data.max_images) == (256, 32) and cfg.data.patch_size == 16
    assert demo_cfg("model.vision.patch_size=8").data.patch_size == 8
    assert not hasattr(cfg.model.vision, "seq_len") and not hasattr(cfg.model.vision, "max_images")
    with pytest.raises(ValueError, match="model.vision.seq_len is now data.seq_len"):
        demo_cfg("model.vision.seq_len=128")
    with pytest.raises(ValueError, match="unknown config key.*train.stepz"):
        demo_cfg("train.stepz=3")
    assert demo_cfg("train.lr=2e-3").train.lr == 0.002  # YAML reads 2e-3 as a string
    with pytest.raises(ValueError, match="train.steps=.many. must be an integer"):
        demo_cfg("train.steps=many")
    for override, message in [
        ("model.text.context_length=8", "context_length"),
        ("train.precision=fp8", "train.precision"),
        ("data.patch_size=8", "data.patch_size=8 differs from model.vision.patch_size=16"),
        ("model.vision.heads=5", "not divisible"),
        ("loss.kind=sigmoid", "logit_bias"),
    ]:
        with pytest.raises(ValueError, match=message):
            demo_cfg(override).validate()
    for name in ("b16", "l16"):
        load_config(f"configs/{name}.yaml").validate()


def test_a_checkpoint_saved_before_a_default_changed_keeps_its_meaning(tmp_path):
    """rope_span's default became 16 (fractional rotary positions), then rope_mode's cap; a checkpoint
    whose config predates a field was trained without it and must be rebuilt as it was."""
    from navit_clip.factory import config_of

    tree = to_dict(load_config())
    del tree["model"]["vision"]["rope_span"], tree["model"]["vision"]["rope_mode"]
    torch.save({"config": tree}, tmp_path / "step_00000001.pt")
    v = config_of(tmp_path / "step_00000001.pt").model.vision
    assert (v.rope_span, v.rope_mode) == (0.0, "span")  # patch indices
    tree["model"]["vision"]["rope_span"] = 4.0
    torch.save({"config": tree}, tmp_path / "step_00000002.pt")
    v = config_of(tmp_path / "step_00000002.pt").model.vision
    assert (v.rope_span, v.rope_mode) == (4.0, "span")  # every image scaled to the span
    tree["model"]["vision"]["rope_mode"] = "cap"
    torch.save({"config": tree}, tmp_path / "step_00000003.pt")
    assert config_of(tmp_path / "step_00000003.pt").model.vision.rope_mode == "cap"


def test_capped_rope_span_is_derived_from_the_training_data_unless_given():
    """rope_mode=cap: positions are patch steps up to the longest side the data trains on, so that
    side is read from data.resolution (once, when the config is loaded, and saved as a number)."""
    assert load_config().model.vision.rope_span == 32.0  # native, max_side 512, patch 16
    demo = load_config("configs/demo.yaml")
    assert (demo.model.vision.rope_mode, demo.model.vision.rope_span) == ("cap", 10.0)  # 160 px sides
    assert load_config("configs/demo.yaml", ["data.resolution.max_side=96"]).model.vision.rope_span == 6.0
    assert load_config("configs/demo.yaml", ["model.vision.patch_size=8"]).model.vision.rope_span == 20.0
    budget = ["data.resolution.kind=budget", "data.resolution.tokens=100"]
    assert load_config("configs/demo.yaml", budget).model.vision.rope_span == 10.0
    assert load_config("configs/demo.yaml", ["model.vision.rope_span=7"]).model.vision.rope_span == 7.0
    spanned = load_config("configs/demo.yaml", ["model.vision.rope_mode=span"]).model.vision
    assert spanned.rope_span == 16.0  # span mode keeps the field's default
    saved = to_dict(demo)
    saved["data"]["resolution"]["max_side"] = 320  # a saved number is never re-derived
    from navit_clip.config import saved_config

    assert saved_config(saved).model.vision.rope_span == 10.0


def test_a_checkpoint_saved_with_the_layout_in_the_model_config_still_loads_and_resumes(tmp_path):
    """seq_len and max_images moved from model.vision to data (the tower never read them). A checkpoint
    saved before keeps loading: the layout goes to data, and resuming compares the model sections
    without the moved keys (not 'saved with a different model config')."""
    from navit_clip.checkpoint import load_checkpoint
    from navit_clip.factory import config_of

    model = tiny_model()
    tree = {"model": to_dict(model.cfg), "data": {"shards": "x.tar"}}  # data took the layout from the model
    tree["model"]["vision"].update(seq_len=512, max_images=12)
    path = tmp_path / "step_00000003.pt"
    torch.save({"config": tree, "model": model.state_dict()}, path)
    old = config_of(path)
    assert (old.data.seq_len, old.data.max_images, old.data.patch_size) == (512, 12, P)
    assert old.model == model.cfg
    load_checkpoint(path, model, model_config=to_dict(model.cfg))  # no "different model config"


def poison_loss(monkeypatch, train_module, poisoned) -> dict:
    """Make the trainer's loss NaN on the calls n (1-based) where poisoned(n); returns the call count."""
    calls = {"n": 0}

    class PoisonedLoss(ContrastiveLoss):
        def forward(self, *args, **kwargs):
            calls["n"] += 1
            loss = super().forward(*args, **kwargs)
            return loss * float("nan") if poisoned(calls["n"]) else loss

    monkeypatch.setattr(train_module, "ContrastiveLoss", PoisonedLoss)
    return calls


def test_non_finite_loss_skips_the_update(small_shards, tmp_path, monkeypatch):
    import json

    import navit_clip.train as train_module

    poison_loss(monkeypatch, train_module, lambda n: n == 2)
    result = train_module.train(
        load_config("configs/demo.yaml", tiny_run(small_shards["train"], tmp_path, **{"train.steps": 4}))
    )
    assert result["skipped_steps"] == 1
    assert (
        torch.isnan(torch.tensor(result["losses"][1]))
        and torch.isfinite(torch.tensor(result["losses"][2:])).all()
    )
    state = torch.load(tmp_path / "step_00000004.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["skipped_steps"] == 1


def test_accumulation_is_the_mean_of_the_micro_batch_gradients(small_shards, tmp_path):
    """One optimiser step over train.accum = 3 micro-batches: its gradient is, by definition, the mean
    of the three micro-batch losses' gradients (each micro-batch its own contrastive problem)."""
    import copy

    from navit_clip.data.pipeline import PackedImageText, make_loader
    from navit_clip.train import TrainState, Window, build, resolve, train_step

    cfg = load_config(
        "configs/demo.yaml",
        tiny_run(small_shards["train"], tmp_path, **{"train.accum": 3, "train.grad_clip": 0}),
    )
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    run = build(cfg, info, resolve(cfg, info))
    micro = [
        b for b, _ in zip(make_loader(PackedImageText(cfg.data, run.tokenizer), num_workers=0), range(3))
    ]
    ref = copy.deepcopy(run.model)
    for batch in copy.deepcopy(micro):
        batch = batch.to(info.device)
        out = ref(batch.images, batch.text)
        loss = run.loss_fn(out["image_emb"], out["text_emb"], out["valid"], out["logit_scale"])
        (loss / 3).backward()
    train_step(run, iter(micro), TrainState(), Window())
    grads = {n: p.grad for n, p in run.model.named_parameters()}
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert any(float((a - b).abs().max()) > 0 for a, b in zip(run.model.parameters(), ref.parameters()))


def test_final_evaluation_can_be_switched_off(small_shards, tmp_path):
    from navit_clip.train import train

    held = {
        "train.steps": 2,
        "eval.shards": small_shards["heldout"],
        "eval.classnames": small_shards["classnames"],
    }
    on = train(load_config("configs/demo.yaml", tiny_run(small_shards["train"], tmp_path / "on", **held)))
    off = train(
        load_config(
            "configs/demo.yaml",
            tiny_run(small_shards["train"], tmp_path / "off", **held, **{"eval.final": False}),
        )
    )
    assert on["zeroshot"]["n"] == 48 and "zeroshot" not in off


def test_training_options_run_bf16_checkpointing_accumulation_sigmoid(small_shards, tmp_path):
    from navit_clip.train import train

    overrides = {
        "train.steps": 2,
        "train.precision": "bf16",
        "train.activation_checkpointing": "true",
        "train.accum": 2,
        "loss.kind": "sigmoid",
        "model.logit_bias": "true",
        "loss.direct_max_slots": 0,
    }
    result = train(load_config("configs/demo.yaml", tiny_run(small_shards["train"], tmp_path, **overrides)))
    assert len(result["losses"]) == 2 and torch.isfinite(torch.tensor(result["losses"])).all()
    assert result["skipped_steps"] == 0


def test_precision_auto_is_resolved_before_training_and_recorded(small_shards, tmp_path):
    """`train.precision=auto` becomes bf16 or fp32 for the device before any work, and config.yaml
    (what the run really did) says which."""
    from navit_clip.train import resolve_precision, train

    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    expected = resolve_precision("auto", cpu)
    assert expected == ("bf16" if torch.cpu._is_amx_tile_supported() else "fp32")
    overrides = {"train.steps": 1, "train.precision": "auto", "train.device": "cpu"}
    result = train(load_config("configs/demo.yaml", tiny_run(small_shards["train"], tmp_path, **overrides)))
    assert torch.isfinite(torch.tensor(result["losses"])).all()
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["precision"] == expected


def _train_on_rank(rank, world, shards, out, parallel, queue_path, extra=None):
    import json

    from navit_clip.train import train

    evaluation = {
        "eval.shards": shards["heldout"],  # one shard: rank 1 reads none and must keep in step
        "eval.classnames": shards["classnames"],
        "eval.batch_seqs": 2,
        "eval.every": 2,
    }
    # FSDP2 runs as configs/l16.yaml ships it: with activation checkpointing
    overrides = {
        "train.steps": 3,
        "train.parallel": parallel,
        "train.activation_checkpointing": str(parallel == "fsdp").lower(),
        **evaluation,
        **(extra or {}),
    }
    result = train(load_config("configs/demo.yaml", tiny_run(shards["train"], out, **overrides)))
    if rank == 0:
        with open(queue_path, "w") as f:
            json.dump({"losses": result["losses"], "zeroshot": result.get("zeroshot")}, f)


def test_ddp_and_fsdp_training_runs_agree(small_shards, tmp_path):
    """train() under 2 gloo ranks, DDP then FSDP2 with activation checkpointing (clipping, checkpoint
    gathering, zero-shot evaluation at step 2 and at the end included): same losses, same zero-shot
    figures on all 48 held-out images."""
    import json

    runs = {}
    for parallel in ("ddp", "fsdp"):
        path = tmp_path / f"{parallel}.json"
        run_world(2, _train_on_rank, small_shards, str(tmp_path / parallel), parallel, str(path))
        runs[parallel] = json.loads(path.read_text())
        # DDP writes one file, FSDP2 on two ranks a sharded step folder (train.checkpoint_format=auto)
        want = {"ddp": "step_00000003.pt", "fsdp": "step_00000003"}[parallel]
        assert latest_checkpoint(tmp_path / parallel).name == want
        logged = [
            json.loads(line) for line in (tmp_path / parallel / "metrics.jsonl").read_text().splitlines()
        ]
        assert [r["step"] for r in logged if "zeroshot_top1" in r] == [2, 3]
    assert len(runs["ddp"]["losses"]) == 3
    torch.testing.assert_close(
        torch.tensor(runs["fsdp"]["losses"]), torch.tensor(runs["ddp"]["losses"]), rtol=1e-5, atol=0
    )
    ddp, fsdp = runs["ddp"]["zeroshot"], runs["fsdp"]["zeroshot"]
    assert ddp["n"] == fsdp["n"] == 48
    assert (fsdp["top1"], fsdp["top5"]) == (ddp["top1"], ddp["top5"])
    assert fsdp["tokens_per_image"] == ddp["tokens_per_image"]


def test_locked_towers_train_alike_under_ddp_and_fsdp(small_shards, tmp_path):
    """model.vision.lock (one group left: the projection) and model.text.lock (two) on 2 gloo ranks:
    DDP and FSDP2 give the same losses, and the frozen weights are those of the first step's model."""
    import json

    lock = {
        "model.vision.lock": "true",
        "model.vision.lock_unlocked_groups": 1,
        "model.text.lock": "true",
        "model.text.lock_unlocked_groups": 2,
        "eval.every": 0,
    }
    runs = {}
    for parallel in ("ddp", "fsdp"):
        path = tmp_path / f"{parallel}.json"
        run_world(2, _train_on_rank, small_shards, str(tmp_path / parallel), parallel, str(path), lock)
        runs[parallel] = json.loads(path.read_text())
    torch.testing.assert_close(
        torch.tensor(runs["fsdp"]["losses"]), torch.tensor(runs["ddp"]["losses"]), rtol=1e-5, atol=0
    )
    cfg = load_config("configs/demo.yaml", tiny_run(small_shards["train"], tmp_path / "x"))
    torch.manual_seed(cfg.train.seed)
    start = NaViTCLIP(cfg.model).state_dict()  # the weights every run starts from (train.build)
    for parallel in ("ddp", "fsdp"):
        end = read_checkpoint(latest_checkpoint(tmp_path / parallel), parts=("model", "optimizer"))
        assert all(torch.equal(end["model"][k], start[k]) for k in start if k.startswith("visual."))
        assert not torch.equal(end["model"]["image_proj.weight"], start["image_proj.weight"])
        n_trainable = sum(1 for k in start if k.startswith(("image_proj.", "text_proj.", "logit_scale")))
        n_trainable += sum(1 for k in start if k.startswith(("text.blocks.0.", "text.norm.")))  # depth 1
        assert len(end["optimizer"]["state"]) == n_trainable, parallel


def test_training_over_two_nodes_of_two_ranks_equals_the_flat_ring(small_shards, tmp_path):
    """train() on 4 gloo ranks with loss.topology=hierarchical (2 nodes of 2) and with the flat ring:
    the same losses (the config reaches the loss; the two-level ring is exact)."""
    import json

    losses = {}
    for topology in ("ring", "hierarchical"):
        path = tmp_path / f"{topology}.json"
        extra = {"loss.topology": topology, "loss.group_size": 2, "eval.every": 0, "eval.final": "false"}
        run_world(4, _train_on_rank, small_shards, str(tmp_path / topology), "ddp", str(path), extra)
        losses[topology] = json.loads(path.read_text())["losses"]
    torch.testing.assert_close(
        torch.tensor(losses["hierarchical"]), torch.tensor(losses["ring"]), rtol=1e-5, atol=0
    )


def test_finite_data_runs_epoch_after_epoch(tmp_path):
    from navit_clip.data.demo import ensure_demo_data
    from navit_clip.train import train

    tiny = ensure_demo_data(tmp_path / "tiny", n_train=24, n_heldout=8, per_shard=24)
    overrides = {"train.steps": 8, "data.resampled": "false", "data.shuffle_buffer": 0}
    result = train(load_config("configs/demo.yaml", tiny_run(tiny["train"], tmp_path / "run", **overrides)))
    assert len(result["losses"]) == 8 and torch.isfinite(torch.tensor(result["losses"])).all()


def test_repeated_non_finite_steps_stop_the_run_with_finite_checkpoints(small_shards, tmp_path, monkeypatch):
    import navit_clip.train as train_module

    calls = poison_loss(monkeypatch, train_module, lambda n: n >= 2)
    overrides = {"train.steps": 20, "train.ckpt_every": 1, "train.max_skipped_steps": 3}
    with pytest.raises(RuntimeError, match="3 steps in a row .*to step 4.* non-finite"):
        train_module.train(
            load_config("configs/demo.yaml", tiny_run(small_shards["train"], tmp_path, **overrides))
        )
    assert calls["n"] == 4  # stopped at once, not after 20 steps
    for path in list_checkpoints(tmp_path):
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_resumed_run_logs_read_as_one_run_and_leftovers_are_cleaned(small_shards, tmp_path):
    import json

    from navit_clip.train import train

    shards = small_shards["train"]
    train(load_config("configs/demo.yaml", tiny_run(shards, tmp_path)))  # 6 steps, checkpoints at 3 and 6
    (tmp_path / "step_00000009.pt.tmp").write_bytes(b"half a checkpoint")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # a torn line from a killed run
    # as if killed after step 6 but before its checkpoint: resume from step 3 and run to the end again
    (tmp_path / "step_00000006.pt").unlink()
    train(load_config("configs/demo.yaml", tiny_run(shards, tmp_path, **{"train.resume": "latest"})))
    steps = [json.loads(r)["step"] for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert not list(tmp_path.glob("*.tmp"))
    # a different model: one clear error naming the fields, before any weight is loaded
    with pytest.raises(ValueError, match=r"model.vision.width: checkpoint 32, config 64") as err:
        train(
            load_config(
                "configs/demo.yaml",
                tiny_run(shards, tmp_path, **{"train.resume": "latest", "model.vision.width": 64}),
            )
        )
    assert "model.text" not in str(err.value) and "size mismatch" not in str(err.value)


def test_data_skips_are_counted_per_window_and_in_total(tmp_path, caplog, capsys):
    """Every skipped sample is counted once in metrics.jsonl (per log window and cumulative), not only
    those of the batch that happened to be last before a log line; each reason is logged when first
    seen, and the run ends with the totals."""
    import json

    from test_data import write_corpus

    from navit_clip.train import train

    shards, _, bad_counts = write_corpus(tmp_path, n_shards=4, per_shard=30, bad_every=3)
    overrides = {
        "data.resampled": "false",
        "data.resolution.kind": "native",
        "data.resolution.max_side": 64,
        "data.max_pixels": 1_000_000,
        "train.steps": 12,
        "train.log_every": 4,
        "train.ckpt_every": 0,
    }
    with caplog.at_level("WARNING", logger="navit_clip"):
        result = train(load_config("configs/demo.yaml", tiny_run(shards, tmp_path / "run", **overrides)))
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    window = {k: sum(r.get(f"data/skip_{k}", 0) for r in rows) for k in bad_counts}
    total = {k: rows[-1].get(f"data/skip_{k}_total", 0) for k in bad_counts}
    assert window == total and sum(total.values()) > 0
    # 12 steps run through the 120-sample corpus at least once: every bad sample is seen at least once
    assert all(total[k] >= n for k, n in bad_counts.items())
    assert {k: result["data_skips"][f"skip_{k}"] for k in bad_counts} == total
    warned = [r.getMessage() for r in caplog.records if "skipping bad samples" in r.getMessage()]
    for k in bad_counts:  # each reason logged once, the first time it is seen
        assert sum(f"skip_{k} " in m for m in warned) == 1, warned
    assert f"skipped {sum(total.values())} bad samples over the run" in capsys.readouterr().out


def test_demo_never_replaces_the_shards_a_user_gave(small_shards, tmp_path, monkeypatch, caplog):
    """The user's data.shards under the default (demo) config: trained on as given, and evaluated on
    what the user names, never on the demo's glyphs; with nothing named, one line says how."""
    import navit_clip.train as train_module

    monkeypatch.setattr(
        train_module, "ensure_demo_data", lambda root: small_shards
    )  # no 8000-image generation
    cfg = load_config("configs/demo.yaml", tiny_run("mine-{0..3}.tar", tmp_path, demo="true"))
    with caplog.at_level("WARNING"):
        train_module.prepare_demo(cfg, DistInfo())
    assert cfg.data.shards == "mine-{0..3}.tar" and cfg.eval.shards == "" and not cfg.eval.classnames
    (line,) = [r.getMessage() for r in caplog.records if "evaluation skipped" in r.getMessage()]
    assert "eval.shards=" in line and "eval.classnames=" in line
    overrides = tiny_run("mine-{0..3}.tar", tmp_path, demo="true") + ["eval.shards=held.tar"]
    cfg = load_config("configs/demo.yaml", overrides + ["eval.classnames=names.txt"])
    train_module.prepare_demo(cfg, DistInfo())
    assert (cfg.eval.shards, cfg.eval.classnames) == ("held.tar", "names.txt")
    cfg = load_config("configs/demo.yaml", tiny_run("''", tmp_path, demo="true"))
    train_module.prepare_demo(cfg, DistInfo())
    assert cfg.data.shards == small_shards["train"]


def test_command_line_from_any_folder_with_overrides_around_resume_and_one_line_errors(tmp_path):
    """`python /path/to/train_clip.py` finds its default config from any folder, takes overrides before
    and after --resume, and a bad value is one line naming the field, before any demo data is made."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train_clip.py")
    cases = {
        ("train.steps=5", "--resume", "latest", "train.eps=0"): "train.eps=0",
        ("data.seq_len=0",): "data.seq_len=0",
        ("train.min_lr=1.0",): "train.min_lr=1.0",
        ("eval.every=-1",): "eval.every=-1",
        ("data.shards=/no/such/train-{0..2}.tar",): "data.shards: 3 of 3 shard files do not exist",
        ("eval.shards=/no/such/heldout.tar",): "eval.shards: 1 of 1",
        ("data.shards=/no/such/*.tar",): "data.shards: data shards pattern '/no/such/*.tar' matches no file",
    }
    for args, field in cases.items():
        proc = subprocess.run([sys.executable, script, *args], cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode != 0
        assert proc.stderr.strip().startswith("config error:") and field in proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "demo_data").exists()  # validation came first


def _resume_on_rank(rank, world, shards, out, overrides, stops, result_path):
    import json
    import multiprocessing
    from pathlib import Path

    # as under torchrun, whose ranks are plain processes: loader workers fork (mp.spawn's children
    # would spawn them, re-importing torch for ~7 s at every epoch of finite data)
    multiprocessing.set_start_method("fork", force=True)

    from navit_clip.train import train

    def run(folder, **extra):
        return train(
            load_config("configs/demo.yaml", tiny_run(shards, Path(out) / folder, **overrides, **extra))
        )

    results = {"full": run("full")["losses"]}
    for k in stops:
        first = run(f"stop{k}", **{"train.stop_at": k})
        second = run(f"stop{k}", **{"train.resume": "latest"})
        results[k] = {"losses": first["losses"] + second["losses"], "replayed": second["replayed_batches"]}
    if rank == 0:
        Path(result_path).write_text(json.dumps(results))


@pytest.mark.parametrize("resampled, stops", [(True, (3, 6)), (False, (3, 5))])
def test_resume_on_two_ranks_and_two_workers_replays_at_most_a_chunk(tmp_path, resampled, stops):
    """2 gloo ranks x 2 loader workers: runs stopped at several steps and resumed give the unbroken
    run's losses; resampled data replay less than one chunk (data.resume_chunk), whatever the step."""
    import json

    from test_data import write_corpus

    shards, _, _ = write_corpus(tmp_path, n_shards=4, per_shard=40, bad_every=7)
    overrides = {
        "data.resampled": str(resampled).lower(),
        "data.num_workers": 2,
        "data.resume_chunk": 4,
        "data.resolution.kind": "native",
        "data.resolution.max_side": 64,
        "data.max_pixels": 1_000_000,
        "train.steps": 7,
        "train.ckpt_every": 0,  # a checkpoint where each run stops, and at the end
    }
    # finite data: a rank's epoch is 3-4 batches, so step 3 resumes inside the first, 5 the second
    path = tmp_path / "result.json"
    run_world(2, _resume_on_rank, shards, str(tmp_path / "runs"), overrides, stops, str(path))
    results = json.loads(path.read_text())
    for k in stops:
        torch.testing.assert_close(
            torch.tensor(results[str(k)]["losses"]), torch.tensor(results["full"]), rtol=1e-6, atol=0
        )
    if resampled:  # chunk of 4 batches: step 3 replays 3, step 6 replays 2 (not 6)
        assert [results[str(k)]["replayed"] for k in stops] == [3, 2]


def test_activation_checkpointing_gives_the_same_gradients_and_parameter_names():
    from navit_clip.config import TrainConfig
    from navit_clip.distributed import parallelize

    images, text = batch_for(0)
    grads, names = [], []
    for on in (False, True):
        model = tiny_model()
        wrapped = parallelize(model, TrainConfig(activation_checkpointing=on), DistInfo())
        assert all(b.checkpointing == on for b in [*model.visual.blocks, *model.text.blocks])
        out = wrapped(images, text)
        ContrastiveLoss("softmax")(
            out["image_emb"], out["text_emb"], out["valid"], out["logit_scale"]
        ).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        names.append(list(model.state_dict()))
    assert names[0] == names[1]  # checkpoints load across the setting
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-6, atol=1e-9)
