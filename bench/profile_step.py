"""Where one training step's time goes: torch.profiler over the learning race's navit-clip step.

The race's model and recipe (ViT-Ti towers, 8 x 256 tokens, side sampling 48..128 px, Beta dropping
0.25) on its shape data, one DataLoader worker. Steps are split into named regions with
`record_function` (data, vision forward, text forward, loss, backward, optimiser); backward is one
region because autograd runs both towers' backward in one call. Prints the regions' share of the
step and the costliest operators; JSON into bench/results/profile_step.json.

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
    with profile(activities=[ProfilerActivity.CPU]) as prof:
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
    save_results(
        "profile_step",
        {
            "step_ms": 1e3 * wall,
            "regions_ms": regions,
            "top_ops_ms": {e.key: e.self_cpu_time_total / 1e3 / STEPS for e in ops},
            "data": str(Path(data["train"])),
        },
    )


if __name__ == "__main__":
    main()
