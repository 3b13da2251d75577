"""Starting from the checkpoints people fine-tune today: open_clip models whose image tower is timm's
(SigLIP, SigLIP2 and its NaFlex models, timm CLIP ViTs). A converted model computes open_clip's image
and text embeddings at the checkpoint's size, packed or one at a time, on every backend; NaFlex towers
equal timm's NaFlexViT forward at non-square grids; a training step has open_clip's gradients; the
tokenizer read from a local file gives open_clip's ids; the converted checkpoint evaluates, fine-tunes,
resumes and exports through the same commands as any other.

Random weights, made here; the towers are the real timm classes at a small size (registered below as
timm models, so open_clip builds them exactly as it builds `vit_base_patch16_siglip_224`): nothing is
downloaded.
"""

import json
from functools import partial

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from openclip_utils import finetune_overrides, perturbed
from timm.layers import resample_abs_pos_embed
from timm.models import register_model
from timm.models.naflexvit import NaFlexVit, NaFlexVitCfg
from timm.models.vision_transformer import VisionTransformer

from navit_clip.cli import main as cli
from navit_clip.convert import converted_state, from_openclip, navit_config

TOL = dict(rtol=1e-5, atol=1e-5)
SIZE, P = 96, 16  # a 6 x 6 grid
HUB_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


HALF = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # timm's pretrained cfg of its SigLIP towers


def _timm_vit(pretrained_cfg=None, **arch):
    def build(pretrained=False, **kwargs):
        for k in HUB_ONLY:
            kwargs.pop(k, None)
        m = VisionTransformer(
            **{"img_size": SIZE, "patch_size": P, "embed_dim": 64, "depth": 2, **arch, **kwargs}
        )
        m.pretrained_cfg = m.default_cfg = dict(pretrained_cfg or {})
        return m

    return build


def _naflex(pretrained=False, **kwargs):
    for k in HUB_ONLY:
        kwargs.pop(k, None)
    kwargs.pop("img_size", None)
    cfg = NaFlexVitCfg(  # naflexvit_base_patch16_siglip's options at a small size
        patch_size=P,
        embed_dim=64,
        depth=2,
        num_heads=4,
        act_layer="gelu_tanh",
        global_pool="map",
        pos_embed_interp_mode="bilinear",
        pos_embed_grid_size=(SIZE // P, SIZE // P),
    )
    m = NaFlexVit(cfg, **kwargs)
    m.pretrained_cfg = m.default_cfg = dict(HALF)
    return m


TIMM_TOWERS = {  # vit_base_patch16_siglip_224 / vit_base_patch32_siglip_256 / a CLIP ViT / a gap ViT, small
    "test_vit_siglip": _timm_vit(HALF, num_heads=4, class_token=False, global_pool="map"),
    "test_vit_siglip2": _timm_vit(
        HALF, num_heads=4, class_token=False, global_pool="map", act_layer="gelu_tanh"
    ),
    "test_vit_clip": _timm_vit(
        num_heads=4, pre_norm=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-5), act_layer="quick_gelu"
    ),
    "test_vit_gap": _timm_vit(num_heads=4, class_token=False, global_pool="avg", mlp_ratio=3.0),
    "test_naflexvit_siglip": _naflex,
}
for _name, _fn in TIMM_TOWERS.items():
    if not timm.is_model(_name):
        _fn.__name__ = _name
        register_model(_fn)

SIGLIP_TEXT = {  # open_clip's SigLIP text_cfg, small
    "context_length": 16,
    "vocab_size": 300,
    "hf_tokenizer_name": "timm/ViT-B-16-SigLIP",
    "tokenizer_kwargs": {"clean": "canonicalize"},
    "width": 48,
    "heads": 2,
    "layers": 2,
    "no_causal_mask": True,
    "proj_bias": True,
    "pool_type": "last",
    "norm_kwargs": {"eps": 1e-6},
}
SIGLIP2_TEXT = {
    **SIGLIP_TEXT,
    "hf_tokenizer_name": "timm/ViT-B-16-SigLIP2",
    "act_kwargs": {"approximate": "tanh"},
}
CLIP_TEXT = {"context_length": 20, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}


def _config(tower: str, text: dict, pool: str = "map", proj: str | None = "none", **extra) -> dict:
    vision = {"image_size": SIZE, "timm_model_name": tower, "timm_model_pretrained": False, "timm_pool": pool}
    vision["timm_proj"] = proj
    return {"embed_dim": 64, "custom_text": True, "vision_cfg": vision, "text_cfg": text, **extra}


CONFIGS = {
    "siglip": _config("test_vit_siglip", SIGLIP_TEXT, init_logit_bias=-10),
    "siglip2": _config("test_vit_siglip2", SIGLIP2_TEXT, init_logit_bias=-10),
    "siglip2_naflex": _config("test_naflexvit_siglip", SIGLIP2_TEXT, init_logit_bias=-10),
    # a class token pooled by it, pre-norm, QuickGELU, open_clip's linear head after the trunk
    "timm_clip": _config(
        "test_vit_clip", CLIP_TEXT, pool="token", proj="linear", embed_dim=40, quick_gelu=True
    ),
    # avg pooling with timm's fc_norm, timm's own classifier head kept as the projection (timm_proj null),
    # and a bidirectional CLIP text tower pooled at argmax (MobileCLIP2-L-14's)
    "timm_gap": _config(
        "test_vit_gap", {**CLIP_TEXT, "no_causal_mask": True}, pool="avg", proj=None, embed_dim=40
    ),
}


def openclip_model(name: str, std: float = 0.05):
    """open_clip's model of CONFIGS[name], every weight perturbed (its inits leave zeros and ones)."""
    torch.manual_seed(0)
    cfg = {k: v for k, v in CONFIGS[name].items() if k != "custom_text"}
    return perturbed(open_clip.CustomTextCLIP(**cfg), std)


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    oc = openclip_model(request.param)
    navit, cfg = from_openclip(oc, CONFIGS[request.param], request.param)
    return request.param, oc, navit, cfg


def test_the_towers_convert_into_the_options_they_compute(pair):
    name, _, _, cfg = pair
    v, t = cfg.model.vision, cfg.model.text
    want = {
        "siglip": ("map", False, "gelu", "bicubic", "none"),
        "siglip2": ("map", False, "gelu_tanh", "bicubic", "none"),
        "siglip2_naflex": ("map", False, "gelu_tanh", "bilinear", "none"),
        "timm_clip": ("cls", True, "quick_gelu", "bicubic", "linear"),
        "timm_gap": ("mean", False, "gelu", "bicubic", "linear_bias"),
    }[name]
    assert (v.pool, v.cls_token, v.act, v.posemb_interp, cfg.model.image_proj) == want
    assert v.fc_norm == (name == "timm_gap") and v.ln_pre == (name == "timm_clip")
    assert v.patch_bias == (name != "timm_clip")  # timm: no patch bias under pre-norm
    if name.startswith("siglip"):
        assert (t.causal, t.pool, cfg.model.text_proj, t.ln_eps) == (False, "last", "linear_bias", 1e-6)
        assert t.act == ("gelu_tanh" if "2" in name else "gelu") and cfg.loss.kind == "sigmoid"
        assert (cfg.tokenizer.kind, cfg.tokenizer.layout, cfg.tokenizer.clean) == ("hf", "hf", "canonicalize")
    else:
        assert (t.causal, t.pool, cfg.tokenizer.kind) == (name == "timm_clip", "eot", "openclip")


def test_image_embeddings_equal_open_clips_at_its_size_packed_or_one_at_a_time(pair):
    _, oc, navit, _ = pair
    images = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    n = (SIZE // P) ** 2
    with torch.no_grad():
        want = oc.encode_image(images)
        for backend in ("grouped", "dense"):
            navit.visual.cfg.attn_backend = backend
            packed = navit.image_proj(navit.visual.encode_images(list(images), seq_len=4 * n))  # one sequence
            alone = torch.cat([navit.encode_image([im]) for im in images])
            torch.testing.assert_close(packed, want, **TOL)
            torch.testing.assert_close(alone, want, **TOL)
        navit.visual.cfg.attn_backend = "auto"


GRIDS = [(3, 9), (7, 2), (6, 6), (1, 12), (10, 5)]  # the table is 6 x 6: shrunk, stretched, kept


def test_naflex_towers_equal_timm_naflexvit_at_non_square_grids():
    """timm's NaFlexViT forward on its own padded NaFlex batch (one image a row, patch_valid masking
    the padding, its per-image bilinear table) against the packed tower, every image in one sequence."""
    oc = openclip_model("siglip2_naflex")
    navit, _ = from_openclip(oc, CONFIGS["siglip2_naflex"])
    g = torch.Generator().manual_seed(2)
    images = [torch.randn(3, h * P, w * P, generator=g) for h, w in GRIDS]
    N = max(h * w for h, w in GRIDS)
    patches = torch.zeros(len(GRIDS), N, P * P * 3)
    coord = torch.zeros(len(GRIDS), N, 2, dtype=torch.long)
    valid = torch.zeros(len(GRIDS), N, dtype=torch.bool)
    for i, ((h, w), im) in enumerate(zip(GRIDS, images)):
        patches[i, : h * w] = im.view(3, h, P, w, P).permute(1, 3, 2, 4, 0).reshape(h * w, -1)
        coord[i, : h * w] = torch.stack(
            torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1
        ).view(-1, 2)
        valid[i, : h * w] = True
    with torch.no_grad():
        want = oc.visual.trunk({"patches": patches, "patch_coord": coord, "patch_valid": valid})
        for backend in ("grouped", "dense"):
            navit.visual.cfg.attn_backend = backend
            got = navit.encode_image(images)
            torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("name", ["siglip2", "timm_clip", "timm_gap"])
def test_fixed_size_towers_at_other_sizes_equal_timm_with_its_resampled_table(name):
    """Away from its size a fixed-size timm ViT is what timm computes with `resample_abs_pos_embed`
    (its dynamic_img_size rule); the class token keeps its own position."""
    oc = openclip_model(name)
    navit, _ = from_openclip(oc, CONFIGS[name], name)
    trunk, G = oc.visual.trunk, SIZE // P
    pos, prefix = trunk.pos_embed.detach(), int(trunk.has_class_token)
    trunk.patch_embed.strict_img_size = False
    for h, w in GRIDS:
        image = torch.randn(1, 3, h * P, w * P, generator=torch.Generator().manual_seed(h * w))
        table = resample_abs_pos_embed(pos, (h, w), (G, G), num_prefix_tokens=prefix)
        with torch.no_grad():
            trunk.pos_embed.data = table
            try:
                want = oc.encode_image(image)
            finally:
                trunk.pos_embed.data = pos
            torch.testing.assert_close(navit.encode_image([image[0]]), want, **TOL)


@pytest.mark.parametrize("name", ["siglip", "siglip2", "timm_clip", "timm_gap"])
def test_text_embeddings_equal_open_clips(name):
    """SigLIP's bidirectional tower reads the whole padded context: ids trimmed of their all-padding
    columns (as the data pipeline may) give the same embeddings, padded back with the pad id."""
    oc = openclip_model(name)
    navit, cfg = from_openclip(oc, CONFIGS[name], name)
    K = cfg.model.text.context_length
    g = torch.Generator().manual_seed(3)
    if name.startswith("timm"):
        ids = open_clip.get_tokenizer("ViT-B-32", context_length=K)(
            ["a photo of a cat.", "!$", "", "x " * 40]
        )
    else:
        pad = navit.cfg.text.pad_id = 1  # SigLIP pads with its end-of-text id
        ids = torch.full((4, K), pad)
        for i, n in enumerate((3, 7, K, 1)):
            ids[i, :n] = torch.randint(2, 300, (n,), generator=g)
    with torch.no_grad():
        want = oc.encode_text(ids)
        torch.testing.assert_close(navit.encode_text(ids), want, **TOL)
        if not name.startswith("timm"):
            torch.testing.assert_close(navit.encode_text(ids[:2, :7]), want[:2], **TOL)


@pytest.mark.parametrize("pool", ["last", "first"])
def test_the_last_block_computing_the_pooled_position_alone_changes_nothing(pool):
    """A tower read at one position runs its last block for that row only (its keys and values still
    from every row): in float64 the embeddings and every gradient equal running the block on all rows."""
    from navit_clip.model.text import TextConfig, TextTransformer

    torch.manual_seed(5)
    cfg = TextConfig(vocab_size=300, context_length=12, width=32, depth=3, heads=4, pool=pool, causal=False)
    tower = TextTransformer(cfg).double()
    ids = torch.randint(1, 300, (5, 12))
    ids[:, 7:] = cfg.pad_id

    def attend(q, k, v):  # bidirectional over the padded context, [N, K, H, d] in and out
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)

    def every_row(ids_NK):  # the blocks on all rows, then the pooled position read
        x = tower.token_embed(ids_NK) + tower.pos_embed
        for block in tower.blocks:
            x = block(x, attend)
        return tower.norm(x)[:, -1 if pool == "last" else 0]

    got, want = tower(ids), every_row(ids)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(want)
    grads = [torch.autograd.grad((out * weights).sum(), list(tower.parameters())) for out in (got, want)]
    for name_p, a, b in zip([n for n, _ in tower.named_parameters()], *grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name_p)


@pytest.mark.parametrize("name", ["siglip2", "siglip2_naflex"])
def test_a_training_step_has_open_clips_gradients(name):
    """Same batch, same sigmoid loss from the checkpoint's logit_scale and logit_bias: every
    converted parameter's gradient equals open_clip's."""
    from open_clip.loss import SigLipLoss

    from navit_clip.loss import sigmoid_loss

    oc = openclip_model(name)
    navit, cfg = from_openclip(oc, CONFIGS[name], name)
    oc.train(), navit.train()
    g = torch.Generator().manual_seed(4)
    images = torch.randn(6, 3, SIZE, SIZE, generator=g)
    ids = torch.randint(2, 300, (6, 16), generator=g)
    SigLipLoss()(
        oc.encode_image(images, normalize=True),
        oc.encode_text(ids, normalize=True),
        oc.logit_scale.exp(),
        oc.logit_bias,
    ).backward()
    emb = navit.image_proj(navit.visual.encode_images(list(images), seq_len=6 * 36))  # one sequence
    sigmoid_loss(
        F.normalize(emb, dim=-1),
        navit.encode_text(ids, normalize=True),
        None,
        navit.logit_scale,
        navit.logit_bias,
    ).backward()
    with torch.no_grad():  # open_clip's gradients through the converter's own mapping
        for p in oc.parameters():
            p.copy_(p.grad)
    want = converted_state(oc, cfg)
    for param_name, p in navit.named_parameters():
        assert float((p.grad - want[param_name]).norm() / want[param_name].norm()) < 2e-5, param_name


def test_every_siglip_and_siglip2_config_converts_as_its_timm_tower():
    """Every SigLIP / SigLIP2 config of open_clip (read from its timm tower built on the meta device)
    and open_clip main's NaFlex SigLIP2 layout (a config JSON naming naflexvit_*_siglip)."""
    names = [m for m in open_clip.list_models() if "SigLIP" in m and "nllb" not in m]
    assert len(names) >= 24
    for name in names:
        cfg = navit_config(open_clip.get_model_config(name), name)
        v, t = cfg.model.vision, cfg.model.text
        assert (v.pool, v.cls_token, cfg.model.image_proj, t.causal, cfg.loss.kind) == (
            "map",
            False,
            "none",
            False,
            "sigmoid",
        ), name
        assert cfg.model.normalize == cfg.data.normalize == "half", (
            name
        )  # SigLIP's mean = std = 0.5, from timm's pretrained cfg
    so400m = navit_config(open_clip.get_model_config("ViT-SO400M-14-SigLIP2"), "so400m").model
    assert (so400m.vision.width, so400m.vision.depth, so400m.vision.heads, so400m.vision.patch_size) == (
        1152,
        27,
        16,
        14,
    )
    assert int(1152 * so400m.vision.mlp_ratio) == 4304 and so400m.text.vocab_size == 256000
    naflex = {  # open_clip main's ViT-B-16-SigLIP2-naflex.json (its text_cfg is ViT-B-16-SigLIP2's)
        **open_clip.get_model_config("ViT-B-16-SigLIP2"),
        "vision_cfg": {
            "image_size": 384,
            "image_seq_len": 576,
            "timm_model_name": "naflexvit_base_patch16_siglip",
            "timm_model_pretrained": False,
            "timm_pool": "map",
            "timm_proj": "none",
        },
    }
    v = navit_config(naflex, "ViT-B-16-SigLIP2-naflex").model.vision
    assert (v.posemb_interp, v.act, v.pool, v.width) == ("bilinear", "gelu_tanh", "map", 768)


def _local_tokenizers(root):
    """A SigLIP-style tokenizer (words, </s> appended, padded with </s>) as a Hugging Face folder and
    as a bare tokenizer.json; and a SentencePiece model."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from navit_clip.tokenizer import train_sentencepiece

    words = "a photo of the cat dog red blue circle square big small".split()
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="</s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(root / "hf")
    (root / "bare").mkdir()
    core.enable_padding(pad_id=1, pad_token="</s>")
    core.save(str(root / "bare" / "tokenizer.json"))
    spm = train_sentencepiece(
        [f"a {w} photo of the {v}" for w in words for v in words], root / "spm", vocab_size=40
    )
    return root / "hf", root / "bare" / "tokenizer.json", spm


CAPTIONS = ["A photo of the CAT!", "a big red circle, a small blue square", "", "dog " * 30, "the_dog"]


def test_a_local_tokenizer_gives_open_clips_ids(tmp_path):
    """The converted config's tokenizer settings (hf layout, open_clip's canonicalize cleaning) read
    from a local folder or a bare tokenizer.json give exactly open_clip's HFTokenizer ids; a
    SentencePiece .model pads with its end-of-text id, as big_vision's SigLIP does."""
    from open_clip.tokenizer import HFTokenizer

    from navit_clip.convert.text import with_tokenizer_file
    from navit_clip.tokenizer import tokenizer_for

    folder, bare, spm = _local_tokenizers(tmp_path)
    want = HFTokenizer(str(folder), context_length=16, clean="canonicalize")(CAPTIONS)
    assert (want == 1).any() and (want[:, -1] == 1).all()  # padded with </s>, truncated ending in </s>
    for path in (folder, bare):
        cfg = navit_config(CONFIGS["siglip"], "siglip")
        cfg.tokenizer = with_tokenizer_file(cfg.tokenizer, path)
        assert torch.equal(tokenizer_for(cfg, fixed_vocab=True)(CAPTIONS), want), path
        assert cfg.model.text.pad_id == 1 and cfg.model.text.vocab_size == 300
    cfg = navit_config(CONFIGS["siglip"], "siglip")
    cfg.tokenizer = with_tokenizer_file(cfg.tokenizer, spm)
    tok = tokenizer_for(cfg, fixed_vocab=True)
    ids = tok(CAPTIONS)
    assert (
        tok.pad_id == tok.eos_id
        and (ids[:, -1] == tok.eos_id).all()
        and cfg.tokenizer.kind == "sentencepiece"
    )
    assert not tok.trim_padding  # a bidirectional tower reads its padding: the pipeline keeps it
    cfg.model.text.vocab_size = 10
    with pytest.raises(ValueError, match="not this checkpoint's tokenizer"):
        tokenizer_for(cfg, fixed_vocab=True)


@pytest.fixture(scope="module")
def converted_siglip(tmp_path_factory):
    """`navit-clip convert-openclip` of a SigLIP2 config JSON and its .safetensors, without a
    tokenizer (conversion needs none)."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("siglip")
    # open_clip main's NaFlex field (default tokens per image): the installed 3.3 does not know it
    as_main_writes_it = {
        **CONFIGS["siglip2"],
        "vision_cfg": {**CONFIGS["siglip2"]["vision_cfg"], "image_seq_len": 36},
    }
    (root / "tiny-siglip2.json").write_text(json.dumps(as_main_writes_it))
    oc = openclip_model("siglip2", std=0.2)
    save_file({k: t.contiguous() for k, t in oc.state_dict().items()}, str(root / "tiny.safetensors"))
    out = root / "converted.pt"
    args = [
        "convert-openclip",
        str(root / "tiny-siglip2.json"),
        "--pretrained",
        str(root / "tiny.safetensors"),
    ]
    assert cli([*args, str(out)]) == 0
    return root, oc, out


def _folder(tmp_path, classes=("cat", "dog", "circle")):
    from PIL import Image

    g = torch.Generator().manual_seed(3)
    for name in classes:
        (tmp_path / "folder" / name).mkdir(parents=True)
        for i in range(3):
            pixels = (torch.rand(SIZE, SIZE + 16 * i, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "folder" / name / f"{i}.png")
    return tmp_path / "folder"


def test_converted_siglip_evaluates_with_the_tokenizer_it_names(converted_siglip, tmp_path, capsys):
    """eval of a checkpoint converted without a tokenizer says in one line which file it needs (the
    hub name it came from); with --tokenizer it runs; the embedded state is open_clip's."""
    root, oc, ckpt = converted_siglip
    folder = _folder(tmp_path)
    hf, _, _ = _local_tokenizers(tmp_path / "tok")
    args = ["eval", str(ckpt), "--data", str(folder), "--templates", "simple", "--out", str(tmp_path / "ev")]
    assert cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tokenizer.path" in err and "timm/ViT-B-16-SigLIP2" in err, err
    assert cli([*args, "--tokenizer", str(hf)]) == 0
    result = json.loads((tmp_path / "ev" / "results.json").read_text())["zeroshot"][0]
    assert result["n"] == 9
    state = torch.load(ckpt, weights_only=True)
    assert float(state["model"]["logit_bias"]) == pytest.approx(float(oc.logit_bias.detach()))
    assert float(state["model"]["logit_scale"]) == pytest.approx(float(oc.logit_scale.detach()))


def test_converted_siglip_fine_tunes_locked_resumes_and_exports(converted_siglip, tmp_path):
    """model.init_from a converted SigLIP2 with tokenizer.path given at train time: the sigmoid loss
    starts from the checkpoint's logit_scale and logit_bias (the first step's loss is open_clip's
    SigLipLoss on those embeddings), locked groups stay, the run resumes to the same weights, and the
    export gives the trained model's embeddings."""
    from navit_clip.checkpoint import latest_checkpoint
    from navit_clip.config import load_config
    from navit_clip.data.demo import ensure_demo_data
    from navit_clip.export import export_encoder, load_exported_module
    from navit_clip.factory import create_model
    from navit_clip.packing import patchify
    from navit_clip.train import train

    _, _, init = converted_siglip
    hf, _, _ = _local_tokenizers(tmp_path / "tok")
    data = ensure_demo_data(tmp_path / "data", n_train=120, n_heldout=16, per_shard=60)
    start = torch.load(init, weights_only=True)["model"]

    def run(out, **extra):
        overrides = {
            "tokenizer.path": str(hf),
            "model.vision.lock": True,
            "model.vision.lock_unlocked_groups": 2,  # the last block with the norm and MAP head
            "data.seq_len": 144,
            "data.resolution.min_side": 48,
            "data.resolution.max_side": 128,
            **extra,
        }
        cfg = load_config(None, finetune_overrides(data["train"], out, init, **overrides))
        assert cfg.loss.kind == "sigmoid" and cfg.model.text.vocab_size == 300
        train(cfg)
        return torch.load(latest_checkpoint(out), weights_only=True)

    whole = run(tmp_path / "whole")
    end = whole["model"]
    moved = {k for k in end if not torch.equal(end[k], start[k])}
    assert "logit_bias" in moved and "visual.head.probe" in moved and "text.blocks.0.qkv.weight" in moved
    assert not any(k.startswith(("visual.blocks.0.", "visual.patch_embed", "visual.posemb")) for k in moved)
    log = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in log if "loss" in r)
    assert first["logit_scale"] == pytest.approx(float(start["logit_scale"].exp()), rel=1e-4)

    run(tmp_path / "resumed", **{"train.stop_at": 2})
    resumed = run(tmp_path / "resumed", **{"train.resume": "latest"})
    assert all(torch.equal(resumed["model"][k], end[k]) for k in end)

    ckpt = latest_checkpoint(tmp_path / "whole")
    out = export_encoder(ckpt, tmp_path / "export", with_text=True, onnx=False)
    mod = load_exported_module(out)
    enc, txt = mod.NaViTEncoder.from_pretrained(out), mod.NaViTTextEncoder.from_pretrained(out)
    model = create_model(ckpt)
    g = torch.Generator().manual_seed(5)
    images = [torch.randn(3, 64, 160, generator=g), torch.randn(3, SIZE, SIZE, generator=g)]
    cut = [patchify(im, P) for im in images]
    ids = torch.randint(2, 14, (3, 16), generator=g)
    with torch.no_grad():
        got = enc(torch.cat([p for p, _ in cut]), torch.tensor([[4, 10], [6, 6]]))["image_embeds"]
        torch.testing.assert_close(got, model.encode_image(images), **TOL)
        torch.testing.assert_close(txt(ids), model.encode_text(ids), **TOL)


@pytest.mark.parametrize("name", ["siglip2", "siglip2_naflex", "timm_clip", "timm_gap"])
def test_locking_trains_what_open_clip_locks_for_every_number_of_unlocked_groups(name):
    """The trainable parameters after locking are open_clip's lock_image_tower (its TimmModel.lock:
    timm's group_matcher groups, the projection head never locked) and lock_text_tower, counted."""
    oc_cfg = {k: v for k, v in CONFIGS[name].items() if k != "custom_text"}

    def trainable(model, prefixes):
        return sum(
            p.numel() for n, p in model.named_parameters() if p.requires_grad and n.startswith(prefixes)
        )

    for groups in range(6):
        oc = open_clip.CustomTextCLIP(**oc_cfg)
        navit, _ = from_openclip(oc, CONFIGS[name], name)
        oc.lock_image_tower(unlocked_groups=groups)
        oc.lock_text_tower(unlocked_layers=groups)
        for tower in (navit.cfg.vision, navit.cfg.text):
            tower.lock, tower.lock_unlocked_groups = True, groups
        navit.lock_towers()
        # a class token's position vector is folded into it: counted once where open_clip has two
        first_unlocked = groups >= len(navit.visual.lock_groups())
        folded = 64 if name == "timm_clip" and first_unlocked else 0
        assert trainable(navit, ("visual.", "image_proj.")) == trainable(oc, ("visual.",)) - folded, groups
        assert trainable(navit, ("text.", "text_proj.")) == trainable(oc, ("text.",)), groups


def test_the_docs_table_of_converting_configs_is_what_converts():
    """docs/converting.md's counts by family are conversion_table()'s, and each example it names falls on
    its side (a README that drifts from the code fails here)."""
    import re
    from pathlib import Path

    from navit_clip.convert import conversion_table

    readme = (Path(__file__).parent.parent / "docs" / "converting.md").read_text()
    table = conversion_table()
    for fam, (converts, refused) in table.items():
        row = next(line for line in readme.splitlines() if line.startswith(f"| {fam} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert (int(cells[1]), int(cells[2])) == (len(converts), len(refused)), fam
        for example in re.findall(r"[A-Za-z0-9_.-]+", cells[3]):
            if example in table[fam][0] + table[fam][1]:
                assert example in converts, example
    assert set(table) == {"open_clip's own towers", "SigLIP", "SigLIP2", "other timm towers"}
