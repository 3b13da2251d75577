"""The three offline tokenizers: open_clip's BPE, a SentencePiece model trained here, a local HF folder."""

import pytest
import torch

from navit_clip.model.clip import ModelConfig, NaViTCLIP
from navit_clip.model.text import TextConfig, TextTransformer, caption_lengths
from navit_clip.model.vision import VisionConfig
from navit_clip.tokenizer import build_tokenizer, train_sentencepiece, trim_padding

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


@pytest.mark.parametrize("pool", ["eot", "map"])
def test_trimmed_captions_equal_padded_ones_with_gradients(pool):
    """Batches carry captions trimmed to the longest one; the text tower's output and gradients match
    the context-length-padded path (causal attention, pooling over real tokens only)."""
    tok = build_tokenizer("openclip", context_length=32)
    ids = tok(["a red circle", "a photo of a small green star on grey", "x"])
    trimmed = trim_padding(ids, tok.pad_id)
    assert trimmed.shape[1] == int((ids != tok.pad_id).sum(1).max()) < 32
    assert torch.equal(trimmed, ids[:, : trimmed.shape[1]])
    assert trim_padding(torch.zeros(2, 5, dtype=torch.long), 0).shape == (2, 1)  # all padding: one column
    torch.manual_seed(0)
    cfg = TextConfig(
        vocab_size=tok.num_embeddings, pad_id=0, context_length=32, width=32, depth=2, heads=4, pool=pool
    )
    model = TextTransformer(cfg).double()
    w = torch.randn(3, 32, dtype=torch.float64)
    outs, grads = [], []
    for x in (ids, trimmed):
        model.zero_grad()
        out = model(x)
        (out * w).sum().backward()
        outs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pool", ["eot", "map"])
def test_packed_captions_equal_padded_ones_with_gradients(pool):
    """The text tower computes only real tokens (captions concatenated, causal within each): its
    pooled embeddings and every parameter's gradient equal the context-length-padded path (relative
    norm of the difference: 1e-12 in float64, 1e-5 in float32), whatever the lengths and their order,
    with filler after the captions' tokens or none (four full contexts: 64 tokens, the layout's multiple)."""
    tok = build_tokenizer("openclip", context_length=16)
    captions = ["a red circle", "x", "", "a photo of a small green star on grey", "a red circle", "!$ deal"]
    torch.manual_seed(0)
    cfg = TextConfig(
        vocab_size=tok.num_embeddings, pad_id=0, context_length=16, width=32, depth=2, heads=4, pool=pool
    )
    for ids, dtype, tol in (
        (tok(captions * 3), torch.float64, 1e-12),
        (tok(captions * 3), torch.float32, 1e-5),
        (tok(["x " * 20] * 4), torch.float64, 1e-12),
    ):
        model = TextTransformer(cfg).to(dtype)
        if pool == "map":  # a probe at unit scale, so the pooling weights are far from uniform
            torch.nn.init.normal_(model.probe)
        w = torch.randn(len(ids), 32, dtype=dtype)
        runs = []
        for forward in (model.forward_padded, model):
            model.zero_grad()
            out = forward(ids)
            (out * w).sum().backward()
            runs.append([out.detach()] + [p.grad.clone() for p in model.parameters()])
        for got, want in zip(runs[1], runs[0]):
            assert ((got - want).norm() / want.norm()).item() < tol
    assert model(ids[:0]).shape == (0, 32)  # a rank with no captions still runs the tower


def test_captions_end_at_their_last_non_padding_token():
    """open_clip's BPE pads with 0, which is also a real token ("!" before "$"): a caption's length
    is where its last non-padding token sits, not how many tokens differ from the padding id."""
    tok = build_tokenizer("openclip", context_length=8)
    ids = tok(["!$", "a", ""])
    assert ids[0, 1] == tok.pad_id  # the real "!" token
    assert caption_lengths(ids, tok.pad_id).tolist() == [4, 3, 2]  # SOT ... EOT, inclusive
    assert caption_lengths(torch.zeros(1, 5, dtype=torch.long), 0).tolist() == [1]  # all padding


@pytest.mark.parametrize("causal", [True, False])
def test_repeated_captions_are_encoded_once_with_the_same_numbers(causal):
    """A batch with repeated captions (template captions of a classification set) encodes each distinct
    caption once: the embeddings and every parameter's gradient equal each caption encoded alone
    (float64, 1e-12), for the packed causal tower and SigLIP's bidirectional one."""
    tok = build_tokenizer("openclip", context_length=16)
    captions = ["a handwritten seven", "seven", "a handwritten seven", "", "seven", "a red circle", ""] * 2
    ids = tok(captions)
    torch.manual_seed(0)
    text = TextConfig(
        vocab_size=tok.num_embeddings,
        pad_id=0,
        context_length=16,
        width=32,
        depth=2,
        heads=4,
        causal=causal,
        pool="eot" if causal else "last",
    )
    vision = VisionConfig(width=32, depth=1, heads=4)
    model = NaViTCLIP(ModelConfig(embed_dim=24, vision=vision, text=text)).to(torch.float64)
    w = torch.randn(len(ids), 24, dtype=torch.float64)
    counted = []
    model.text.forward = _counting(model.text.forward, counted)
    runs = []
    for batches in ([ids], [row[None] for row in ids]):  # the batch at once, then one caption at a time
        model.zero_grad()
        out = torch.cat([model.encode_text(b, normalize=True) for b in batches])
        (out * w).sum().backward()
        runs.append([out.detach()] + [p.grad.clone() for p in model.text.parameters()])
    assert counted[0] == len(set(captions))  # 4 distinct captions of 14
    for got, want in zip(*runs):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _counting(forward, counted: list):
    def wrapped(ids_NK):
        counted.append(ids_NK.shape[0])
        return forward(ids_NK)

    return wrapped
