"""The three offline tokenizers: open_clip's BPE, a SentencePiece model trained here, a local HF folder."""

import torch

from navit_clip.model.text import TextConfig, TextTransformer
from navit_clip.tokenizer import build_tokenizer, train_sentencepiece

CAPTIONS = [
    f"a {c} {s} on a {b} background"
    for c in ("red", "green", "blue")
    for s in ("circle", "square")
    for b in ("dark", "light")
] * 20


def check_layout(tok, K):
    ids = tok(["red", "a very very very very very very very very very long caption indeed"])
    assert ids.shape == (2, K) and ids.dtype == torch.long
    assert (ids[0] == tok.pad_id).any() and not (ids[1] == tok.pad_id).any()  # padded / truncated
    assert int(ids.max()) < tok.num_embeddings
    # the text tower pools at the last real token and accepts every id
    model = TextTransformer(
        TextConfig(
            vocab_size=tok.num_embeddings, pad_id=tok.pad_id, context_length=K, width=16, depth=1, heads=2
        )
    )
    assert model(ids).shape == (2, 16)


def test_openclip_bpe():
    tok = build_tokenizer("openclip", context_length=12)
    check_layout(tok, 12)
    assert tok(["a"])[0, 0] == 49406 and tok.pad_id == 0


def test_sentencepiece_trained_on_captions(tmp_path):
    path = train_sentencepiece(CAPTIONS, tmp_path / "spm", vocab_size=40)
    tok = build_tokenizer("sentencepiece", str(path), context_length=12)
    check_layout(tok, 12)
    ids = tok(["a red circle"])[0]
    assert tok.eos_id in ids.tolist()


def test_local_huggingface_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {
        w: i
        for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]"] + sorted({w for c in CAPTIONS for w in c.split()}))
    }
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    ).save_pretrained(tmp_path / "hf")
    tok = build_tokenizer("hf", str(tmp_path / "hf"), context_length=12)
    check_layout(tok, 12)
    assert tok(["red circle"])[0].tolist()[:3] == [vocab["red"], vocab["circle"], vocab["[EOS]"]]
