"""Starting from open_clip weights: a converted ViT computes open_clip's embeddings, packed or not, at
any size (against open_clip with a timm-resampled position table), through `navit-clip eval`, and it
fine-tunes with towers locked. Random weights, made here: nothing is downloaded."""

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from openclip_utils import finetune_overrides, perturbed
from PIL import Image
from timm.layers import resample_abs_pos_embed

from navit_clip.cli import main as cli
from navit_clip.convert import from_openclip, navit_config

TOL = dict(rtol=1e-5, atol=1e-5)
# open_clip ViT configs, tiny: biases and ln_pre (CLIP's), QuickGELU (OpenAI's weights); and mean
# pooling with no ln_pre and plain GELU
CONFIGS = {
    "clip": {
        "embed_dim": 48,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 16, "patch_size": 32},
        "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    },
    "avg_no_ln_pre": {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": 96,
            "layers": 2,
            "width": 48,
            "head_width": 16,
            "patch_size": 16,
            "pool_type": "avg",
            "no_ln_pre": True,
        },
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    },
}


def openclip_model(name: str, std: float = 0.05):
    """open_clip's CLIP of CONFIGS[name], every weight perturbed (its inits leave zeros and ones)."""
    torch.manual_seed(0)
    return perturbed(open_clip.CLIP(**CONFIGS[name]), std)


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    oc = openclip_model(request.param)
    navit, cfg = from_openclip(oc, CONFIGS[request.param])
    return request.param, oc, navit


def test_embeddings_equal_openclip_at_its_own_size_packed_or_one_at_a_time(pair):
    name, oc, navit = pair
    size = CONFIGS[name]["vision_cfg"]["image_size"]
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = oc.encode_image(images)
        for backend in ("grouped", "dense"):
            navit.visual.cfg.attn_backend = backend
            n = (size // CONFIGS[name]["vision_cfg"]["patch_size"]) ** 2
            packed = navit.image_proj(navit.visual.encode_images(list(images), seq_len=4 * n))  # one sequence
            alone = torch.cat([navit.encode_image([im]) for im in images])
            torch.testing.assert_close(packed, want, **TOL)
            torch.testing.assert_close(alone, want, **TOL)
        navit.visual.cfg.attn_backend = "auto"


def test_text_embeddings_equal_openclip(pair):
    name, oc, navit = pair
    K = CONFIGS[name]["text_cfg"]["context_length"]
    tok = open_clip.get_tokenizer("ViT-B-32", context_length=K)
    ids = tok(["a photo of a cat.", "!$", "", "a long caption " * 8, "two words"])
    with torch.no_grad():
        torch.testing.assert_close(navit.encode_text(ids), oc.encode_text(ids), **TOL)


@pytest.mark.parametrize("hw", [(160, 288), (96, 96), (320, 224), (32, 480), (448, 448)])
def test_other_sizes_equal_openclip_with_a_timm_resampled_position_table(pair, hw):
    name, oc, navit = pair
    v = CONFIGS[name]["vision_cfg"]
    P, G = v["patch_size"], v["image_size"] // v["patch_size"]
    h, w = hw[0] // P, hw[1] // P
    pos = oc.visual.positional_embedding.detach()
    resampled = resample_abs_pos_embed(pos[None, 1:], (h, w), (G, G), num_prefix_tokens=0)[0]
    image = torch.randn(1, 3, h * P, w * P, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        oc.visual.positional_embedding.data = torch.cat([pos[:1], resampled])
        try:
            want = oc.encode_image(image)
        finally:
            oc.visual.positional_embedding.data = pos
        torch.testing.assert_close(navit.encode_image([image[0]]), want, **TOL)


def test_a_training_step_has_open_clips_gradients():
    """Same batch, same contrastive loss: every converted parameter's gradient equals open_clip's
    (the folded class token's that of its class embedding, which open_clip's position 0 shares)."""
    from open_clip.loss import ClipLoss

    from navit_clip.convert import converted_state
    from navit_clip.loss import clip_loss

    oc = openclip_model("clip")
    navit, cfg = from_openclip(oc, CONFIGS["clip"])
    oc.train(), navit.train()
    images = torch.randn(6, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    ids = open_clip.get_tokenizer("ViT-B-32", context_length=20)(
        [f"caption {i} of a thing" for i in range(6)]
    )
    ClipLoss()(*oc(images, ids)).backward()
    emb = navit.image_proj(navit.visual.encode_images(list(images), seq_len=6 * 49))  # one sequence
    clip_loss(
        F.normalize(emb, dim=-1), navit.encode_text(ids, normalize=True), None, navit.logit_scale
    ).backward()
    with torch.no_grad():  # open_clip's gradients through the converter's own mapping
        for p in oc.parameters():
            p.copy_(p.grad)
    want = converted_state(oc, cfg)
    want["visual.cls_token"] = oc.visual.class_embedding.detach()
    for name, p in navit.named_parameters():  # measured: at most 7e-6 of a tensor's norm
        assert float((p.grad - want[name]).norm() / want[name].norm()) < 2e-5, name


def test_every_open_clip_config_converts_or_says_why_in_one_line():
    converted, refused = [], []
    for model in open_clip.list_models():
        try:
            navit_config(open_clip.get_model_config(model), model)
            converted.append(model)
        except ValueError as e:
            assert "\n" not in str(e) and model in str(e)
            refused.append(model)
    assert {"ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-B-32-quickgelu"} <= set(converted)
    assert {"convnext_base", "RN50", "coca_ViT-B-32"} <= set(refused)
    cfg = navit_config(open_clip.get_model_config("ViT-L-14-336"), "ViT-L-14-336")
    v = cfg.model.vision
    assert (v.patch_size, v.max_grid, v.width, v.heads, v.depth, v.act) == (14, 24, 1024, 16, 24, "gelu")
    assert cfg.data.resolution.max_side == 336  # eval's note on budgets past the trained size reads it
    assert navit_config(open_clip.get_model_config("ViT-B-32-quickgelu")).model.text.act == "quick_gelu"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """`navit-clip convert-openclip` of an open_clip checkpoint file (a model-config .json of the
    tiny CLIP config and its .safetensors, as open_clip_train and the hub write them)."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("convert")
    (root / "tiny-vit.json").write_text(json.dumps(CONFIGS["clip"]))
    oc = openclip_model("clip", std=0.2)  # a random model whose zero-shot answers differ by image
    save_file({k: t.contiguous() for k, t in oc.state_dict().items()}, str(root / "tiny.safetensors"))
    torch.save(
        {"epoch": 3, "state_dict": {f"module.{k}": t for k, t in oc.state_dict().items()}}, root / "ddp.pt"
    )
    out = root / "converted.pt"
    assert (
        cli(
            [
                "convert-openclip",
                str(root / "tiny-vit.json"),
                "--pretrained",
                str(root / "tiny.safetensors"),
                str(out),
            ]
        )
        == 0
    )
    return root, oc, out


def test_converted_checkpoint_reads_any_checkpoint_form_and_evaluates_like_openclip(converted, tmp_path):
    """Zero-shot through `navit-clip eval` at 224 x 224 equals open_clip's own zero-shot (its val
    transform, its classifier builder) on the same folder; an open_clip_train .pt converts the same."""
    root, oc, out = converted
    again = tmp_path / "from_ddp.pt"
    assert (
        cli(
            [
                "convert-openclip",
                str(root / "tiny-vit.json"),
                "--pretrained",
                str(root / "ddp.pt"),
                str(again),
            ]
        )
        == 0
    )
    a, b = torch.load(out, weights_only=True)["model"], torch.load(again, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    classes = ["apple", "boat", "cloud", "door"]
    g = torch.Generator().manual_seed(3)
    folder = tmp_path / "folder"
    files = []
    for c, name in enumerate(classes):
        (folder / name).mkdir(parents=True)
        for i in range(6):
            blocks = torch.rand(1, 3, 4, 4, generator=g)  # 16 random colours, 56 px each
            pixels = torch.nn.functional.interpolate(blocks, size=224, mode="nearest")[0].permute(1, 2, 0)
            pixels = (pixels * 255).round().to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / name / f"{i}.png")
            files.append((folder / name / f"{i}.png", c))
    rc = cli(
        ["eval", str(out), "--data", str(folder), "--templates", "simple", "--out", str(tmp_path / "ev")]
    )
    assert rc == 0
    ours = json.loads((tmp_path / "ev" / "results.json").read_text())["zeroshot"][0]

    from open_clip import zero_shot_metadata as meta

    tok = open_clip.get_tokenizer("ViT-B-32", context_length=20)
    classifier = open_clip.build_zero_shot_classifier(
        oc, tok, classes, meta.SIMPLE_IMAGENET_TEMPLATES, num_classes_per_batch=None, device="cpu"
    )
    preprocess = open_clip.image_transform(224, is_train=False)
    with torch.no_grad():
        images = torch.stack([preprocess(Image.open(f).convert("RGB")) for f, _ in files])
        logits = oc.encode_image(images, normalize=True) @ classifier
    labels = torch.tensor([c for _, c in files])
    top1 = int((logits.argmax(1) == labels).sum()) / len(files)
    top5 = int((logits.topk(4, 1).indices == labels[:, None]).any(1).sum()) / len(files)  # 4 classes
    assert len(set(logits.argmax(1).tolist())) > 1  # the random model does not answer one class
    assert ours["n"] == len(files)
    assert ours["top1"] == pytest.approx(top1, abs=1e-9) and ours["top5"] == pytest.approx(top5, abs=1e-9)
    per_class = [int((logits.argmax(1) == labels)[labels == c].sum()) / 6 for c in range(4)]
    assert ours["per_class_top1"] == pytest.approx(per_class, abs=1e-9)


def test_what_does_not_convert_is_one_line_naming_it(converted, tmp_path, capsys):
    root, oc, _ = converted
    state = oc.state_dict()
    torch.save({k: t for k, t in state.items() if k != "visual.ln_post.weight"}, tmp_path / "missing.pt")
    wider = open_clip.CLIP(**{**CONFIGS["clip"], "embed_dim": 40}).state_dict()
    torch.save(wider, tmp_path / "other_size.bin")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    cases = {
        "convnext_base": ["convnext_base", "ConvNeXt"],
        "RN50": ["RN50", "ResNet"],
        "missing.pt": ["missing key", "visual.ln_post.weight"],
        "other_size.bin": ["text_projection", "shape"],
        "junk.pt": ["junk.pt", "not a readable checkpoint"],
        "no_such_model": ["no_such_model"],
    }
    for case, words in cases.items():
        model, weights = (
            (case, "") if "." not in case else (str(root / "tiny-vit.json"), str(tmp_path / case))
        )
        args = ["convert-openclip", model, str(tmp_path / "out.pt")] + (
            ["--pretrained", weights] if weights else []
        )
        assert cli(args) == 2, case
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("navit-clip convert-openclip: error:"), err
        assert all(w in err for w in words), (case, err)
    assert not (tmp_path / "out.pt").exists()


def test_locked_fine_tune_from_a_converted_checkpoint_trains_checkpoints_and_resumes(converted, tmp_path):
    """model.init_from with the image tower locked but its last group (the projection) and the text
    tower locked but its last two groups (last block + final norm, projection): frozen parameters do
    not move and have no optimiser state; the run resumes from its checkpoint to the same end."""
    from navit_clip.checkpoint import latest_checkpoint
    from navit_clip.config import load_config
    from navit_clip.data.demo import ensure_demo_data
    from navit_clip.train import train

    _, _, init = converted
    data = ensure_demo_data(tmp_path / "data", n_train=120, n_heldout=16, per_shard=60)
    start = torch.load(init, weights_only=True)["model"]

    def run(out, **extra):
        overrides = {
            "model.vision.lock": True,
            "model.vision.lock_unlocked_groups": 1,
            "model.text.lock": True,
            "model.text.lock_unlocked_groups": 2,
            "model.vision.width": 999,  # replaced by the checkpoint's, with a warning
            "data.seq_len": 128,
            "data.resolution.min_side": 64,
            "data.resolution.max_side": 160,
            **extra,
        }
        cfg = load_config(None, finetune_overrides(data["train"], out, init, **overrides))
        assert cfg.model.vision.width == 64 and cfg.tokenizer.context_length == 20
        train(cfg)
        return torch.load(latest_checkpoint(out), weights_only=True)

    whole = run(tmp_path / "whole")
    end = whole["model"]
    moved = {k for k in end if not torch.equal(end[k], start[k])}
    assert moved, "nothing trained"
    assert all(
        k.startswith(("image_proj.", "text_proj.", "text.blocks.1.", "text.norm.", "logit_scale"))
        for k in moved
    ), moved
    assert "image_proj.weight" in moved and "text.blocks.1.mlp.fc1.weight" in moved
    assert not any(k.startswith(("visual.", "text.blocks.0.", "text.token_embed")) for k in moved)
    trainable = 1 + 1 + len([k for k in start if k.startswith(("text.blocks.1.", "text.norm."))]) + 1
    assert len(whole["optimizer"]["state"]) == trainable  # image_proj, text_proj, last block + norm, scale

    run(tmp_path / "resumed", **{"train.stop_at": 2})
    resumed = run(tmp_path / "resumed", **{"train.resume": "latest"})
    assert all(torch.equal(resumed["model"][k], end[k]) for k in end)


def test_the_exported_encoder_of_a_converted_model_gives_open_clips_embeddings(converted, tmp_path):
    """navit-clip export of a converted checkpoint: transformers' AutoModel and onnxruntime give
    open_clip's own image embedding at its size, and agree with each other at another size."""
    import onnxruntime as ort
    from transformers import AutoModel

    from navit_clip.export import export_encoder, load_exported_module
    from navit_clip.packing import patchify

    _, oc, ckpt = converted
    out = export_encoder(ckpt, tmp_path / "export", onnx=True)
    hf = AutoModel.from_pretrained(str(out), trust_remote_code=True).eval()
    session = ort.InferenceSession(str(out / "encoder.onnx"))
    layout = load_exported_module(out).token_layout
    g = torch.Generator().manual_seed(5)
    square, wide = torch.randn(3, 224, 224, generator=g), torch.randn(3, 128, 320, generator=g)
    cut = [patchify(im, 32) for im in (square, wide)]
    pixels, grid = torch.cat([p for p, _ in cut]), torch.tensor([[7, 7], [4, 10]])
    with torch.no_grad():
        want = oc.encode_image(square[None])[0]
        got = hf(pixel_values=pixels, grid_hw=grid)["image_embeds"]
    torch.testing.assert_close(got[0], want, **TOL)
    coords, token_grid, seg = layout(grid)
    feeds = {
        "pixel_values": pixels,
        "coords": coords,
        "token_grid": token_grid,
        "segment_ids": seg,
        "grid_hw": grid,
    }
    onnx = session.run(["image_embeds"], {k: v.numpy() for k, v in feeds.items()})[0]
    torch.testing.assert_close(torch.from_numpy(onnx), got, rtol=1e-4, atol=1e-5)


def test_locking_unlocks_open_clips_groups_and_optionally_the_norms():
    """The trainable parameters after locking, counted, are open_clip's lock_image_tower /
    lock_text_tower's for every number of unlocked groups (open_clip keeps the class embedding and
    position 0 as two tensors of width W where navit-clip folds them into one)."""
    oc_cfg = CONFIGS["clip"]
    W, depth = oc_cfg["vision_cfg"]["width"], oc_cfg["vision_cfg"]["layers"]
    for groups in range(depth + 3):
        oc = open_clip.CLIP(**oc_cfg)
        navit, _ = from_openclip(oc, oc_cfg)
        oc.lock_image_tower(unlocked_groups=groups)
        oc.lock_text_tower(unlocked_layers=groups)
        for tower in (navit.cfg.vision, navit.cfg.text):
            tower.lock, tower.lock_unlocked_groups = True, groups
        navit.lock_towers()

        def trainable(model, prefixes):
            return sum(
                p.numel() for n, p in model.named_parameters() if p.requires_grad and n.startswith(prefixes)
            )

        folded = W if groups == depth + 2 else 0  # the first group unlocked: class embedding, counted once
        assert trainable(navit, ("visual.", "image_proj.")) == trainable(oc, ("visual.",)) - folded, groups
        oc_text = trainable(
            oc, ("token_embedding", "positional_embedding", "transformer.", "ln_final", "text_projection")
        )
        assert trainable(navit, ("text.", "text_proj.")) == oc_text, groups
    navit.cfg.vision.lock_unlocked_groups, navit.cfg.vision.lock_norms = 0, False
    frozen = navit.lock_towers()
    assert not any("norm" in n for n in frozen if n.startswith("visual."))
    assert any(n.startswith("visual.blocks.0.attn") for n in frozen)
