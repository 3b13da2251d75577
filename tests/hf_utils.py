"""transformers CLIP, SigLIP and SigLIP2 (NaFlex) models at a small size with random weights, written to a
folder as a user holds them (config.json, model.safetensors, tokenizer files, preprocessor_config.json);
and real images (the demo's rendered glyphs and shapes, PIL). Nothing is downloaded."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from openclip_utils import perturbed

P = 16
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=P)
TEXT = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
WORDS = "a photo of the cat dog red blue circle square big small one two three".split()


def word_tokenizer(folder: Path, pad: str = "<pad>"):
    """A SigLIP-style Hugging Face tokenizer (words, </s> appended) saved into `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=pad, eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(folder)
    return tok


def hf_model(family: str, whole: bool = True, seed: int = 0, image_size: int = 96, act: str | None = None):
    """A transformers model of `family` (clip, siglip, siglip2) with every weight perturbed."""
    import transformers as tf

    torch.manual_seed(seed)
    v = dict(VISION)
    if family == "clip":
        vc = tf.CLIPVisionConfig(
            **v, image_size=image_size, projection_dim=40, hidden_act=act or "quick_gelu"
        )
        if not whole:
            return perturbed(tf.CLIPVisionModelWithProjection(vc), 0.05)
        tc = tf.CLIPTextConfig(**TEXT, vocab_size=49408, max_position_embeddings=16, projection_dim=40)
        return perturbed(
            tf.CLIPModel(
                tf.CLIPConfig(text_config=tc.to_dict(), vision_config=vc.to_dict(), projection_dim=40)
            ),
            0.05,
        )
    if family == "siglip":
        vc = tf.SiglipVisionConfig(**v, image_size=image_size, hidden_act=act or "gelu_pytorch_tanh")
        tc_cls, cfg_cls, model_cls, vis_cls = (
            tf.SiglipTextConfig,
            tf.SiglipConfig,
            tf.SiglipModel,
            tf.SiglipVisionModel,
        )
    else:
        vc = tf.Siglip2VisionConfig(**v, num_patches=36, hidden_act=act or "gelu_pytorch_tanh")
        tc_cls, cfg_cls, model_cls, vis_cls = (
            tf.Siglip2TextConfig,
            tf.Siglip2Config,
            tf.Siglip2Model,
            tf.Siglip2VisionModel,
        )
    if not whole:
        return perturbed(vis_cls(vc), 0.05)
    tc = tc_cls(
        **{**TEXT, "hidden_size": 64, "intermediate_size": 128},
        vocab_size=40,
        max_position_embeddings=12,
        pad_token_id=0,
        eos_token_id=1,
    )
    return perturbed(model_cls(cfg_cls(text_config=tc.to_dict(), vision_config=vc.to_dict())), 0.05)


def clip_tokenizer(folder: Path, context_length: int = 16):
    """transformers' CLIPTokenizer of open_clip's BPE files, padding with its end-of-text token as
    openai's does."""
    from navit_clip.tokenizer import write_clip_tokenizer

    return write_clip_tokenizer(folder, context_length, pad_token="<|endoftext|>")


def hf_folder(root: Path, family: str, whole: bool = True, **kwargs) -> tuple[Path, torch.nn.Module]:
    """`hf_model` saved with save_pretrained, with its tokenizer (whole models) and image processor."""
    model = hf_model(family, whole, **kwargs)
    folder = root / f"{family}{'' if whole else '_vision'}"
    model.save_pretrained(folder)
    if whole:
        (clip_tokenizer if family == "clip" else word_tokenizer)(folder)
    return folder, model


def real_images(n: int = 4, seed: int = 0) -> list:
    """PIL images of the demo's glyphs and shapes at several sizes and aspect ratios."""
    from navit_clip.data.demo import draw_glyph, draw_shape

    rng = random.Random(seed)
    out = []
    for i in range(n):
        img, _ = draw_glyph(rng, "seven") if i % 2 else draw_shape(rng, "circle")
        w, h = [(96, 96), (160, 64), (48, 112), (130, 90)][i % 4]
        out.append(img.convert("RGB").resize((w, h)))
    return out
