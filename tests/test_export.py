"""Exported encoder round trips: the torch-only module, transformers' AutoModel and onnxruntime all
reproduce the training-time encoder's per-token and pooled outputs."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from navit_clip.config import Config, to_dict
from navit_clip.export import export_encoder, load_exported_module
from navit_clip.model.clip import NaViTCLIP
from navit_clip.packing import pack_images, patchify

P = 8
# different sizes, one image a single patch tall (8 x 48 px -> 1 x 6 patches), one a single patch
SIZES = [(24, 40), (8, 48), (32, 16), (8, 8), (40, 40)]


def rel(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm())


@pytest.fixture(
    scope="module",
    params=[
        ("learned", "map", True),
        ("rope2d+fractional", "mean", False),
        ("rope2d", "map", False),
        ("learned2d", "cls", True),  # a converted open_clip ViT's options (tests/test_openclip.py)
        ("learned2d", "siglip", True),  # a converted SigLIP2 NaFlex's options (tests/test_siglip.py)
    ],
)
def exported(request, tmp_path_factory):
    """Both export forms: with the text tower, and the default (`navit-clip export CKPT OUT`)."""
    posemb, pool, with_text = request.param
    root = tmp_path_factory.mktemp(f"export_{posemb}")
    cfg = Config()
    v = cfg.model.vision
    v.patch_size, v.width, v.depth, v.heads, v.posemb, v.pool = P, 32, 2, 4, posemb, pool
    cfg.data.patch_size, cfg.data.seq_len, cfg.data.max_images = P, 64, 4
    if posemb == "rope2d":  # capped positions: the test images are patch steps up to 3, shrunk past it
        v.rope_mode, v.rope_span = "cap", 3.0
    if pool == "cls":  # CLIP's ViT: class token, a 3 x 3 table resampled per image, biases, ln_pre
        v.cls_token, v.max_grid, v.bias, v.ln_pre, v.qk_norm, v.act = True, 3, True, True, False, "quick_gelu"
        cfg.model.text.act = "quick_gelu"
    cfg.model.text.width, cfg.model.text.depth, cfg.model.text.heads = 32, 1, 4
    cfg.model.embed_dim = 24
    if pool == "siglip":  # MAP head with biases, no projection, bilinear table, tanh GELU, SigLIP's text
        v.pool, v.max_grid, v.bias, v.qk_norm, v.act, v.posemb_interp = (
            "map",
            3,
            True,
            False,
            "gelu_tanh",
            "bilinear",
        )
        cfg.model.embed_dim, cfg.model.image_proj, cfg.model.text_proj = 32, "none", "linear_bias"
        cfg.model.text.causal, cfg.model.text.pool, cfg.model.text.act = False, "last", "gelu_tanh"
        cfg.model.logit_bias = True
    torch.manual_seed(0)
    model = NaViTCLIP(cfg.model).eval()
    ckpt = root / "step_00000001.pt"
    torch.save({"model": model.state_dict(), "config": to_dict(cfg)}, ckpt)
    out = export_encoder(ckpt, root / "out", onnx=True, with_text=with_text)
    return model, out


def images():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(3, h, w, generator=g) for h, w in SIZES]


def reference(model):
    """Training-time encoder on a packed batch: per-image tokens [n_i, D], pooled [D], embeds [E]."""
    imgs = images()
    batch = pack_images(imgs, P, seq_len=64, max_images=4)
    with torch.no_grad():
        out = model.visual(batch)
        embeds = model.image_proj(out.pooled)
    tokens, pooled, emb = [None] * len(imgs), [None] * len(imgs), [None] * len(imgs)
    for b, e in batch.slot_valid.nonzero().tolist():
        i = int(batch.slot_example[b, e])
        tokens[i] = out.tokens[b, batch.segment_ids[b] == e + 1]
        pooled[i], emb[i] = out.pooled[b, e], embeds[b, e]
    return torch.cat(tokens), torch.stack(pooled), torch.stack(emb)


def flat_inputs():
    cut = [patchify(im, P) for im in images()]
    return torch.cat([p for p, _ in cut]), torch.tensor([[h // P, w // P] for h, w in SIZES])


def check(out, ref):
    for got, want in zip(out, ref):
        assert rel(got, want) < 1e-5


def test_standalone_module_needs_only_torch_and_matches(exported):
    model, out = exported
    for name in ("navit_encoder.py", "navit_layers.py", "navit_posemb.py"):
        src = (out / name).read_text()
        assert "navit_clip" not in src and "import transformers" not in src
    mod = load_exported_module(out)
    enc = mod.NaViTEncoder.from_pretrained(out)
    pixels, grid = flat_inputs()
    with torch.no_grad():
        r = enc(pixels, grid)
        check((r["last_hidden_state"], r["pooler_output"], r["image_embeds"]), reference(model))
        # SigLIP2-style padded interface: same numbers
        N = 64
        padded = torch.zeros(len(SIZES), N, pixels.shape[1])
        mask = torch.zeros(len(SIZES), N, dtype=torch.long)
        start = 0
        for i, (h, w) in enumerate(grid.tolist()):
            padded[i, : h * w] = pixels[start : start + h * w]
            mask[i, : h * w] = 1
            start += h * w
        rp = enc.forward_padded(padded, mask, grid)
        assert torch.equal(rp["last_hidden_state"][mask.bool()], r["last_hidden_state"])
        assert torch.all(rp["last_hidden_state"][~mask.bool()] == 0)
        torch.testing.assert_close(rp["pooler_output"], r["pooler_output"])


def test_transformers_automodel_matches(exported):
    from transformers import AutoModel

    model, out = exported
    hf = AutoModel.from_pretrained(str(out), trust_remote_code=True).eval()
    pixels, grid = flat_inputs()
    with torch.no_grad():
        r = hf(pixel_values=pixels, grid_hw=grid)
    check((r["last_hidden_state"], r["pooler_output"], r["image_embeds"]), reference(model))


def test_onnxruntime_matches_with_other_token_and_image_counts(exported):
    import onnxruntime as ort

    model, out = exported
    mod = load_exported_module(out)
    session = ort.InferenceSession(str(out / "encoder.onnx"))
    pixels, grid = flat_inputs()  # 5 images, 58 tokens: not the shapes the graph was traced with
    coords, token_grid, seg = mod.token_layout(grid)
    feeds = {
        "pixel_values": pixels.numpy(),
        "coords": coords.numpy(),
        "token_grid": token_grid.numpy(),
        "segment_ids": seg.numpy(),
        "grid_hw": grid.numpy(),
    }
    check(session.run(None, feeds), reference(model))


def test_processor_layout_and_budget(exported):
    _, out = exported
    mod = load_exported_module(out)
    proc = mod.NaViTProcessor.from_pretrained(out, max_tokens=12)
    arr = (np.random.default_rng(0).random((16, 24, 3)) * 255).astype("uint8")
    exact = Image.fromarray(arr)  # 2 x 3 patches: a 6-token budget keeps it as it is (no resize)
    proc_same = mod.NaViTProcessor(P, proc.mean, proc.std, max_tokens=6)
    r = proc_same([exact])
    assert r["grid_hw"].tolist() == [[2, 3]]
    x = (torch.tensor(arr).float() / 255 - torch.tensor(proc.mean)) / torch.tensor(proc.std)
    expected, _ = patchify(x.permute(2, 0, 1), P)
    torch.testing.assert_close(r["pixel_values"], expected)
    tall = Image.new("RGB", (400, 20))
    r = proc([tall, exact])
    assert all(h * w <= 12 for h, w in r["grid_hw"].tolist())
    assert r["grid_hw"][0, 0] == 1  # a single patch tall, aspect kept within the budget
    merged = mod.NaViTProcessor(P, proc.mean, proc.std, max_tokens=64, merge=2)(
        [Image.new("RGB", (37, 90)), exact]
    )
    assert all(h % 2 == 0 and w % 2 == 0 for h, w in merged["grid_hw"].tolist())
    enc = mod.NaViTEncoder.from_pretrained(out)
    with torch.no_grad():
        tokens = enc(**merged)["last_hidden_state"]
    m, g = mod.merge_2x2(tokens, merged["grid_hw"])
    assert m.shape == (tokens.shape[0] // 4, 4 * tokens.shape[1]) and torch.equal(g, merged["grid_hw"] // 2)
    h, w = merged["grid_hw"][0].tolist()
    # merged token 0 is the top-left 2 x 2 block: tokens (0,0), (0,1), (1,0), (1,1)
    torch.testing.assert_close(m[0], torch.cat([tokens[0], tokens[1], tokens[w], tokens[w + 1]]))
    sys.modules.pop("navit_encoder", None)


def test_readme_vlm_example_runs(exported, tmp_path, monkeypatch):
    import re
    from pathlib import Path

    _, out = exported
    readme = (Path(__file__).parent.parent / "docs" / "export.md").read_text()
    code = next(
        block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "LlamaForCausalLM" in block
    )
    (tmp_path / "exported").symlink_to(out)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "docs/export.md", "exec"), scope)
    assert scope["logits"].shape[1] == scope["tokens"].shape[0] + 3
    sys.modules.pop("navit_encoder", None)


STANDALONE = """
import sys
for name in ("navit_clip", "transformers", "open_clip", "safetensors", "PIL", "numpy"):
    sys.modules[name] = None  # importing any of them now fails: only torch is allowed
import torch
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from navit_encoder import NaViTEncoder, NaViTTextEncoder
inputs = torch.load(sys.argv[2])
enc = NaViTEncoder.from_pretrained(sys.argv[1])
with_text = (Path(sys.argv[1]) / "text_model.safetensors").exists()
with torch.no_grad():
    out = enc(inputs["pixels"], inputs["grid"])
    got = {"tokens": out["last_hidden_state"], "pooled": out["pooler_output"], "embeds": out["image_embeds"]}
    if with_text:
        got["text"] = NaViTTextEncoder.from_pretrained(sys.argv[1])(inputs["ids"])
    else:
        try:
            NaViTTextEncoder.from_pretrained(sys.argv[1])
        except FileNotFoundError as e:
            got["no_text"] = str(e)
    torch.save(got, sys.argv[3])
"""


def test_export_loads_in_a_process_that_has_only_torch(exported, tmp_path):
    import subprocess

    model, out = exported
    pixels, grid = flat_inputs()
    ids = torch.randint(1, 100, (3, model.cfg.text.context_length))
    ids[0, 5:] = model.cfg.text.pad_id
    torch.save({"pixels": pixels, "grid": grid, "ids": ids}, tmp_path / "inputs.pt")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            STANDALONE,
            str(out),
            str(tmp_path / "inputs.pt"),
            str(tmp_path / "outputs.pt"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = torch.load(tmp_path / "outputs.pt")
    check((got["tokens"], got["pooled"], got["embeds"]), reference(model))
    if (out / "text_model.safetensors").exists():
        with torch.no_grad():
            assert rel(got["text"], model.encode_text(ids)) < 1e-5
    else:  # the default export: a clear error, not a missing-file traceback from deep inside
        assert "--with-text" in got["no_text"]


def test_processor_sizes_images_like_the_budget_policy(exported):
    import random

    from navit_clip.packing import budget_grid

    _, out = exported
    mod = load_exported_module(out)
    rng = random.Random(0)
    for merge in (1, 2):
        for tokens in (4, 16, 64, 256, 1024):
            proc = mod.NaViTProcessor(16, (0.5,) * 3, (0.5,) * 3, max_tokens=tokens, merge=merge)
            for _ in range(100):
                h, w = rng.randint(1, 3000), rng.randint(1, 3000)
                assert proc.grid_for(h, w) == budget_grid(h, w, 16, tokens, merge)
    sys.modules.pop("navit_encoder", None)


def test_preprocess_val_and_the_exported_processor_agree_on_one_photo(exported):
    """The documented default 'same image': preprocess_val and the exported processor size a photo
    alike (256 patches), so its embedding is the same from the training code and from the export."""
    from navit_clip.factory import create_model_and_transforms

    model, out = exported
    ckpt = out.parent / "step_00000001.pt"
    _, _, preprocess = create_model_and_transforms(ckpt)
    mod = load_exported_module(out)
    enc, proc = mod.NaViTEncoder.from_pretrained(out), mod.NaViTProcessor.from_pretrained(out)
    g = torch.Generator().manual_seed(3)
    photos = [
        Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())
        for h, w in ((300, 451), (97, 60))
    ]
    with torch.no_grad():
        ours = model.encode_image([preprocess(p) for p in photos])
        theirs = enc(**proc(photos))["image_embeds"]
    assert [tuple(preprocess(p).shape[1:]) for p in photos] == [
        (int(h) * P, int(w) * P) for h, w in proc(photos)["grid_hw"]
    ]
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
