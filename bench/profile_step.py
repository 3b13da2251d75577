"""Where one training step's time goes: torch.profiler over the learning race's navit-clip step.

The race's model and recipe (ViT-Ti towers, 8 x 256 tokens, side sampling 48..128 px, Beta dropping
0.25) on its shape data, one DataLoader worker. Steps are split into named regions with
`record_function` (data, vision forward, text forward, loss, backward, optimiser); backward is one
region because autograd runs both towers' backward in one call. Prints the regions' share of the
step, the costliest operators, and who calls fill_ and copy_ (each call's nearest caller
that is not one of the allocation ops around it: zeros, zero_, new_zeros, empty, fill_, and the
shape it filled); JSON into bench/results/profile_step.json.

    python bench/profile_step.py
"""

import time
from pathlib import Path

import torch
from common import save_results
from learning_race import NAVIT, ROOT
from torch.profiler import ProfilerActivity, profile, record_function

from navit_clip.config import load_config
from navit_clip.data.demo import ensure_demo_data
from navit_clip.data.pipeline import PackedImageText, make_loader
from navit_clip.loss import ContrastiveLoss
from navit_clip.model.clip import NaViTCLIP
from navit_clip.tokenizer import tokenizer_for
from navit_clip.train import make_optimizer

REGIONS = ("data", "vision forward", "text forward", "loss", "backward", "optimizer")
WARMUP, STEPS = 3, 8


def main() -> None:
    data = ensure_demo_data(
        ROOT / "bench" / "results" / "race_data", n_train=8000, n_heldout=500, task="shapes"
    )
    cfg = load_config(str(ROOT / "configs" / "demo.yaml"), NAVIT + [f"data.shards={data['train']}"])
    tok = tokenizer_for(cfg)
    torch.manual_seed(0)
    model = NaViTCLIP(cfg.model).train()
    opt = make_optimizer(model, cfg.train)
    loss_fn = ContrastiveLoss(cfg.loss.kind)
    batches = iter(make_loader(PackedImageText(cfg.data, tok)))

    def step():
        with record_function("data"):
            batch = next(batches).to("cpu")
        with record_function("vision forward"):
            img, valid = model.encode_packed(batch.images)
        with record_function("text forward"):
            flat = valid.flatten()
            txt = img.new_zeros(flat.shape[0], img.shape[-1])
            ids = batch.text.flatten(0, 1)[flat]
            txt[flat] = model.encode_text(ids, normalize=True)
        with record_function("loss"):
            loss = loss_fn(img.flatten(0, 1), txt, flat, model.logit_scale)
        with record_function("backward"):
            opt.zero_grad(set_to_none=True)
            loss.backward()
        with record_function("optimizer"):
            opt.step()

    for _ in range(WARMUP):
        step()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(STEPS):
            step()
    wall = (time.perf_counter() - t0) / STEPS
    events = prof.key_averages()
    by_name = {e.key: e for e in events}
    regions = {r: by_name[r].cpu_time_total / 1e3 / STEPS for r in REGIONS if r in by_name}
    print(f"one step: {1e3 * wall:.0f} ms wall (profiled, {STEPS} steps)")
    print(f"{'region':16s} {'ms/step':>8s} {'share':>6s}")
    for r, ms in regions.items():
        print(f"{r:16s} {ms:8.1f} {100 * ms / (1e3 * wall):5.1f}%")
    ops = sorted(
        (
            e
            for e in events
            if not e.key.startswith(("data", "vision", "text", "loss", "backward", "optim", "Profiler"))
        ),
        key=lambda e: e.self_cpu_time_total,
        reverse=True,
    )[:10]
    print("costliest operators (self time):")
    for e in ops:
        print(
            f"  {e.key:40s} {e.self_cpu_time_total / 1e3 / STEPS:8.1f} ms/step  {e.count // STEPS:5d} calls/step"
        )
    callers = {op: callers_of(prof, op) for op in FOLLOWED}
    for op, found in callers.items():
        print(f"who calls {op} (its nearest caller beyond the allocation ops, and the shape):")
        for (caller, shape), (ms, calls) in sorted(found.items(), key=lambda kv: -kv[1][0])[:6]:
            print(f"  {caller:46s} {shape:20s} {ms / STEPS:7.1f} ms/step  {calls // STEPS:4d} calls/step")
    save_results(
        "profile_step",
        {
            "step_ms": 1e3 * wall,
            "regions_ms": regions,
            "top_ops_ms": {e.key: e.self_cpu_time_total / 1e3 / STEPS for e in ops},
            "callers_ms": {
                op: {f"{c} {sh}": ms / STEPS for (c, sh), (ms, _) in found.items()}
                for op, found in callers.items()
            },
            "data": str(Path(data["train"])),
        },
    )


FOLLOWED = ("aten::fill_", "aten::copy_")  # the step's costliest non-arithmetic operators
ALLOCATION = (
    "aten::zeros",
    "aten::zero_",
    "aten::new_zeros",
    "aten::empty",
    "aten::fill_",
    "aten::zeros_like",
)


def callers_of(prof, op: str) -> dict:
    """op's self time (ms) and calls, by (nearest caller that is not an allocation op, shape)."""
    out: dict = {}
    for e in prof.events():
        if e.name != op:
            continue
        parent = e.cpu_parent
        while parent is not None and parent.name in ALLOCATION:
            parent = parent.cpu_parent
        shape = "x".join(map(str, e.input_shapes[0])) if e.input_shapes and e.input_shapes[0] else "-"
        key = (parent.name if parent is not None else "(top level: autograd)", shape)
        ms, calls = out.get(key, (0.0, 0))
        out[key] = (ms + e.self_cpu_time_total / 1e3, calls + 1)
    return out


if __name__ == "__main__":
    main()
