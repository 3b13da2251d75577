"""transformers checkpoints in and out: a CLIP, SigLIP or SigLIP2 (NaFlex) folder converts into a navit-clip
model with transformers' embeddings, logit scale and bias and tokenizer ids; a navit-clip checkpoint of that
shape exports into a folder that transformers' own classes and image processor load with no remote code
and that reproduces navit-clip's embeddings; a fine-tune between the two ends stays exact.

Every model is built from a config with random weights (tests/hf_utils.py): nothing is downloaded."""

import json

import pytest
import torch
import transformers as tf
from hf_utils import P, hf_folder, real_images
from openclip_utils import finetune_overrides

from navit_clip.cli import main as cli
from navit_clip.convert.hf import from_hf
from navit_clip.factory import create_model
from navit_clip.packing import patchify, unpatchify
from navit_clip.tokenizer import load_hf_tokenizer, tokenizer_for

TOL = dict(rtol=1e-5, atol=1e-5)
CAPTIONS = ["a photo of the cat", "A big red circle!", "", "dog " * 30, "two blue squares"]


def _out(x):
    return getattr(x, "pooler_output", x) if not isinstance(x, torch.Tensor) else x


def _naflex_inputs(images, max_patches=64):
    """SigLIP2 NaFlex inputs for [3, H, W] images (sides multiples of P): the patches navit-clip cuts,
    padded to `max_patches` a row, the mask and the spatial shapes."""
    cut = [patchify(im, P) for im in images]
    pixel_values = torch.zeros(len(images), max_patches, P * P * 3)
    mask = torch.zeros(len(images), max_patches, dtype=torch.long)
    for i, (patches, _) in enumerate(cut):
        pixel_values[i, : len(patches)], mask[i, : len(patches)] = patches, 1
    shapes = torch.tensor([[im.shape[1] // P, im.shape[2] // P] for im in images])
    return dict(pixel_values=pixel_values, pixel_attention_mask=mask, spatial_shapes=shapes)


@pytest.fixture(scope="module", params=["clip", "siglip", "siglip2"])
def converted(request, tmp_path_factory):
    family = request.param
    folder, hf = hf_folder(tmp_path_factory.mktemp("hf"), family)
    navit, cfg, _ = from_hf(folder)
    return family, folder, hf.eval(), navit, cfg


def test_a_converted_model_has_transformers_embeddings_scale_bias_and_token_ids(converted):
    family, folder, hf, navit, cfg = converted
    want_ids = load_hf_tokenizer(folder)(
        CAPTIONS,
        padding="max_length",
        max_length=cfg.tokenizer.context_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    ids = tokenizer_for(cfg, fixed_vocab=True)(CAPTIONS)
    assert torch.equal(ids, want_ids)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        torch.testing.assert_close(navit.encode_text(ids), _out(hf.get_text_features(input_ids=ids)), **TOL)
        if family == "siglip2":  # several aspect ratios, each fed the same patches (spatial_shapes)
            images = [torch.randn(3, h * P, w * P, generator=g) for h, w in ((6, 6), (3, 10), (8, 4), (1, 7))]
            want = _out(hf.get_image_features(**_naflex_inputs(images)))
        else:
            images = [torch.randn(3, 96, 96, generator=g) for _ in range(3)]
            want = _out(hf.get_image_features(pixel_values=torch.stack(images)))
        torch.testing.assert_close(navit.encode_image(images), want, **TOL)
    assert float(navit.logit_scale) == pytest.approx(float(hf.logit_scale))
    if family != "clip":
        assert float(navit.logit_bias) == pytest.approx(float(hf.logit_bias)) and cfg.loss.kind == "sigmoid"


@pytest.mark.parametrize("family", ["clip", "siglip2"])
def test_a_vision_tower_alone_converts_and_exports_back_to_its_class(family, tmp_path):
    """CLIPVisionModelWithProjection / Siglip2VisionModel -> convert -> export --format hf: the class comes
    back, AutoImageProcessor's pixels give navit-clip's embeddings (real images, several sizes)."""
    folder, hf = hf_folder(tmp_path, family, whole=False)
    ckpt, out = tmp_path / "c.pt", tmp_path / "export"
    assert cli(["convert", str(folder), str(ckpt)]) == 0
    assert cli(["export", str(ckpt), str(out), "--format", "hf"]) == 0
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "preprocessor_config.json"}
    loaded = type(hf).from_pretrained(out).eval()
    inputs = tf.AutoImageProcessor.from_pretrained(out)(images=real_images(4), return_tensors="pt")
    with torch.no_grad():
        o = loaded(**inputs)
        got = o.image_embeds if family == "clip" else o.pooler_output
        torch.testing.assert_close(
            got, _out(hf(**inputs).image_embeds if family == "clip" else hf(**inputs).pooler_output), **TOL
        )
        torch.testing.assert_close(got, create_model(ckpt).encode_image(_pixels(family, inputs)), **TOL)


def _pixels(family, inputs):
    """The [3, H, W] images an image processor's output holds (SigLIP2's patches laid back out)."""
    if family != "siglip2":
        return list(inputs["pixel_values"])
    shapes = inputs["spatial_shapes"].tolist()
    return [unpatchify(inputs["pixel_values"][i, : h * w], h, w, P) for i, (h, w) in enumerate(shapes)]


@pytest.mark.parametrize("family", ["clip", "siglip", "siglip2"])
def test_export_with_text_is_the_whole_transformers_model(family, tmp_path):
    folder, _ = hf_folder(tmp_path, family)
    ckpt, out = tmp_path / "c.pt", tmp_path / "export"
    assert cli(["convert", str(folder), str(ckpt)]) == 0
    assert cli(["export", str(ckpt), str(out), "--format", "hf", "--with-text"]) == 0
    loaded = tf.AutoModel.from_pretrained(out).eval()  # no trust_remote_code
    assert (
        type(loaded).__name__
        == {"clip": "CLIPModel", "siglip": "SiglipModel", "siglip2": "Siglip2Model"}[family]
    )
    model = create_model(ckpt)
    inputs = tf.AutoImageProcessor.from_pretrained(out)(images=real_images(3), return_tensors="pt")
    tok = tf.AutoTokenizer.from_pretrained(out)
    ids = tok(
        CAPTIONS, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        torch.testing.assert_close(
            _out(loaded.get_image_features(**inputs)), model.encode_image(_pixels(family, inputs)), **TOL
        )
        torch.testing.assert_close(
            _out(loaded.get_text_features(input_ids=ids)), model.encode_text(ids), **TOL
        )
    assert float(loaded.logit_scale) == pytest.approx(float(model.logit_scale))


def test_the_demo_tower_is_refused_naming_its_fields_and_the_default_export_still_takes_it(tmp_path, capsys):
    from navit_clip.checkpoint import atomic_save
    from navit_clip.config import load_config, to_dict
    from navit_clip.model.clip import NaViTCLIP

    cfg = load_config("configs/demo.yaml", [])
    ckpt = tmp_path / "demo.pt"
    atomic_save({"model": NaViTCLIP(cfg.model).state_dict(), "config": to_dict(cfg), "step": 0}, ckpt)
    capsys.readouterr()
    assert cli(["export", str(ckpt), str(tmp_path / "hf"), "--format", "hf"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.vision.posemb=rope2d" in err and "qk_norm=True" in err, err
    assert cli(["export", str(ckpt), str(tmp_path / "navit"), "--no-onnx"]) == 0


def test_what_has_no_counterpart_is_refused_in_one_line(tmp_path, capsys):
    folder, _ = hf_folder(tmp_path, "siglip", whole=False, act="silu")
    capsys.readouterr()
    assert cli(["convert", str(folder), str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "hidden_act='silu'" in err, err
    other = tmp_path / "vit"
    tf.ViTModel(
        tf.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(other)
    capsys.readouterr()
    assert cli(["convert", str(other), str(tmp_path / "y.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'vit'" in err, err


def test_siglip2_naflex_round_trip_through_a_packed_fine_tune(tmp_path):
    """transformers Siglip2Model -> convert -> a few packed fine-tuning steps (model.init_from) -> export
    --format hf -> Siglip2VisionModel.from_pretrained equals the fine-tuned navit-clip model."""
    from navit_clip.checkpoint import latest_checkpoint
    from navit_clip.config import load_config
    from navit_clip.data.demo import ensure_demo_data
    from navit_clip.train import train

    folder, _ = hf_folder(tmp_path, "siglip2")
    init = tmp_path / "init.pt"
    assert cli(["convert", str(folder), str(init)]) == 0
    data = ensure_demo_data(tmp_path / "data", n_train=60, n_heldout=8, per_shard=60)
    extra = {"data.seq_len": 144, "data.resolution.min_side": 48, "data.resolution.max_side": 128}
    train(load_config(None, finetune_overrides(data["train"], tmp_path / "ft", init, **extra)))
    ckpt = latest_checkpoint(tmp_path / "ft")
    start, end = torch.load(init, weights_only=True)["model"], torch.load(ckpt, weights_only=True)["model"]
    assert not torch.equal(start["visual.posemb.table"], end["visual.posemb.table"])
    out = tmp_path / "export"
    assert cli(["export", str(ckpt), str(out), "--format", "hf"]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "siglip2_vision_model"
    loaded = tf.Siglip2VisionModel.from_pretrained(out).eval()
    inputs = tf.AutoImageProcessor.from_pretrained(out)(images=real_images(4), return_tensors="pt")
    with torch.no_grad():
        got = loaded(**inputs).pooler_output
        torch.testing.assert_close(got, create_model(ckpt).encode_image(_pixels("siglip2", inputs)), **TOL)


def test_a_tiny_llava_reads_the_exported_siglip_towers_penultimate_features(tmp_path):
    """A random LlavaForConditionalGeneration (from a config) whose vision tower is a --format hf SigLIP
    export runs a forward on a real image; its tower's hidden_states[-2] (LLaVA's vision_feature_layer)
    equal navit-clip's penultimate-block features for the same pixels, in the training model and in the
    default export."""
    from navit_clip.export import export_encoder, load_exported_module
    from navit_clip.packing import pack_images

    folder, _ = hf_folder(tmp_path, "siglip")
    ckpt, out = tmp_path / "c.pt", tmp_path / "export"
    assert cli(["convert", str(folder), str(ckpt)]) == 0
    assert cli(["export", str(ckpt), str(out), "--format", "hf"]) == 0
    vision = tf.SiglipVisionModel.from_pretrained(out)
    text = tf.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=64,
    )
    config = tf.LlavaConfig(
        vision_config=vision.config.to_dict(),
        text_config=text.to_dict(),
        image_token_id=63,
        vision_feature_layer=-2,
        vision_feature_select_strategy="full",
    )
    llava = tf.LlavaForConditionalGeneration(config).eval()
    llava.model.vision_tower.load_state_dict(vision.state_dict())
    seen = {}

    def keep(module, args, output):  # returns None: the output is left as it is
        seen["hidden"] = output.hidden_states

    llava.model.vision_tower.register_forward_hook(keep)
    pixels = tf.AutoImageProcessor.from_pretrained(out)(
        images=real_images(1), return_tensors="pt"
    ).pixel_values
    n = (pixels.shape[-1] // P) ** 2
    ids = torch.tensor([[1, *[63] * n, 5, 7]])
    with torch.no_grad():
        logits = llava(input_ids=ids, pixel_values=pixels).logits
        assert logits.shape == (1, n + 3, 64) and torch.isfinite(logits).all()
        want = seen["hidden"][-2][0]  # [n, D]
        model = create_model(ckpt)
        batch = pack_images([pixels[0]], P, n, 1)
        ours = model.visual(batch, output_hidden_states=True).hidden_states[-2][0, :n]
        torch.testing.assert_close(ours, want, **TOL)
        default = export_encoder(ckpt, tmp_path / "navit", onnx=False)
        encoder = load_exported_module(default).NaViTEncoder.from_pretrained(default)
        side = pixels.shape[-1] // P
        got = encoder(patchify(pixels[0], P)[0], torch.tensor([[side, side]]))["penultimate_hidden_state"]
        torch.testing.assert_close(got, want, **TOL)


def test_a_tower_trained_from_configs_b16_siglip2_exports_as_siglip2_vision_model(tmp_path):
    """configs/b16_siglip2.yaml's tower (shrunk) is Siglip2VisionModel's: it exports with --format hf and
    transformers' processor + model give navit-clip's embeddings; --with-text with open_clip's BPE is
    refused in one line (its bidirectional text tower reads padding no transformers tokenizer writes)."""
    from navit_clip.checkpoint import atomic_save
    from navit_clip.config import load_config, to_dict
    from navit_clip.model.clip import NaViTCLIP

    small = [
        "model.embed_dim=64",
        "model.vision.width=64",
        "model.vision.depth=2",
        "model.vision.heads=4",
        "model.text.width=32",
        "model.text.depth=1",
        "model.text.heads=2",
    ]
    cfg = load_config("configs/b16_siglip2.yaml", small)
    torch.manual_seed(0)
    ckpt = tmp_path / "c.pt"
    atomic_save({"model": NaViTCLIP(cfg.model).state_dict(), "config": to_dict(cfg), "step": 0}, ckpt)
    out = tmp_path / "export"
    assert cli(["export", str(ckpt), str(out), "--format", "hf"]) == 0
    loaded = tf.Siglip2VisionModel.from_pretrained(out).eval()
    inputs = tf.AutoImageProcessor.from_pretrained(out)(images=real_images(4), return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(**inputs).pooler_output, create_model(ckpt).encode_image(_pixels("siglip2", inputs)), **TOL
        )
    assert cli(["export", str(ckpt), str(tmp_path / "t"), "--format", "hf", "--with-text"]) == 2


def test_the_docs_table_of_transformers_families_is_the_codes():
    from pathlib import Path

    from navit_clip.convert.hf import hf_table_markdown

    assert hf_table_markdown() in (Path(__file__).parents[1] / "docs" / "converting.md").read_text()


@pytest.mark.parametrize("layout", ["sharded", "bin"])
def test_a_sharded_or_bin_folder_converts_as_one_file_does(layout, tmp_path):
    """A folder saved in shards (model.safetensors.index.json + pieces), or as an older pytorch_model.bin,
    gives the same checkpoint as one model.safetensors."""
    folder, hf = hf_folder(tmp_path, "siglip2", whole=False)
    other = tmp_path / layout
    if layout == "sharded":
        hf.save_pretrained(other, max_shard_size="100KB")
        assert (other / "model.safetensors.index.json").is_file()
    else:
        hf.config.save_pretrained(other)
        torch.save(hf.state_dict(), other / "pytorch_model.bin")
        assert not list(other.glob("*.safetensors"))
    one, _, _ = from_hf(folder)
    many, _, _ = from_hf(other)
    for k, t in one.state_dict().items():
        if k.startswith(("visual.", "image_proj")):
            assert torch.equal(t, many.state_dict()[k]), k
