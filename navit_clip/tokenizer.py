"""Tokenizers, all offline: open_clip's BPE (shipped inside open_clip_torch), SentencePiece models,
and local Hugging Face tokenizers. Each is a callable list[str] -> LongTensor [N, K], right-padded
with `pad_id`, truncated to K tokens with the end-of-text token kept last; `num_embeddings` is the
embedding table size the text tower needs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def trim_padding(ids_NK: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Drop the columns that are padding in every row (keeping at least one).

    Exact for the text tower: its attention is causal and it pools at the last real token (or over
    real tokens only), so trailing padding never reaches a real token's output. Captions of ~10
    tokens padded to a context of 32 spend two thirds of the text tower on padding otherwise.
    """
    real_K = (ids_NK != pad_id).any(0)
    K = int(real_K.nonzero().max()) + 1 if bool(real_K.any()) else 1
    return ids_NK[:, :K]


class OpenCLIPTokenizer:
    """open_clip's byte-level BPE (49408 tokens); pad 0, start/end-of-text tokens added."""

    def __init__(self, context_length: int):
        from open_clip.tokenizer import SimpleTokenizer

        self.inner = SimpleTokenizer(context_length=context_length)
        self.context_length = context_length
        self.pad_id = 0
        self.num_embeddings = len(self.inner.encoder)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.inner(texts, context_length=self.context_length)


CLEANS = ("none", "whitespace", "lower", "canonicalize")  # open_clip's text cleaning functions


def clean_fn(clean: str):
    """open_clip's text cleaning before tokenizing (its HFTokenizer's `clean`): canonicalize is
    big_vision's (lower case, punctuation removed), what SigLIP's checkpoints were trained on."""
    if clean not in CLEANS:
        raise ValueError(f"tokenizer.clean={clean!r} is not one of {CLEANS}")
    if clean == "none":
        return None
    from open_clip.tokenizer import get_clean_fn

    return get_clean_fn(clean)


class _IdsTokenizer:
    """Shared layout for tokenizers that produce id lists: [bos] ids [eos], truncated, padded."""

    context_length: int
    pad_id: int
    bos_id: int | None
    eos_id: int | None
    clean = None

    def _encode(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def _cleaned(self, texts: list[str]) -> list[str]:
        return texts if self.clean is None else [self.clean(t) for t in texts]

    def __call__(self, texts: list[str]) -> torch.Tensor:
        texts = self._cleaned(texts)
        K = self.context_length
        out = torch.full((len(texts), K), self.pad_id, dtype=torch.long)
        head = [self.bos_id] if self.bos_id is not None else []
        tail = [self.eos_id] if self.eos_id is not None else []
        for i, ids in enumerate(self._encode(texts)):
            ids = (head + ids)[: K - len(tail)] + tail
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


class SentencePieceTokenizer(_IdsTokenizer):
    """A SentencePiece model file. Without a pad piece, padding gets an extra embedding row;
    `pad_with_eos` pads with the end-of-text id instead (big_vision's SigLIP layout: eos sticky,
    pad value = eos)."""

    def __init__(self, model_file: str | Path, context_length: int, pad_with_eos: bool = False, clean="none"):
        import sentencepiece as spm

        if not Path(model_file).exists():
            raise ValueError(
                f"SentencePiece model {model_file} does not exist; train one with `navit-clip train-tokenizer`"
            )
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.context_length = context_length
        vocab = self.sp.get_piece_size()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else vocab
        self.num_embeddings = vocab if self.sp.pad_id() >= 0 else vocab + 1
        self.bos_id = None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        if pad_with_eos and self.eos_id is not None:
            self.pad_id, self.num_embeddings = self.eos_id, vocab
        self.clean = clean_fn(clean)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)


def load_hf_tokenizer(path: str | Path):
    """A local Hugging Face tokenizer: a folder transformers can load (read with local_files_only:
    never downloads), or a `tokenizer.json` file (its folder when a tokenizer_config.json sits beside
    it, else the file alone, its padding token read from the file's padding settings or its
    <pad> / [PAD] token)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    if not path.exists():
        raise ValueError(f"Hugging Face tokenizer {path} does not exist (nothing is downloaded)")
    if path.is_dir() or (path.parent / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(
            str(path if path.is_dir() else path.parent), local_files_only=True
        )
    tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
    padding = tok.backend_tokenizer.padding
    pad = (
        padding["pad_token"]
        if padding
        else next((t for t in ("<pad>", "[PAD]") if t in tok.get_vocab()), None)
    )
    if pad is not None:
        tok.pad_token = pad
    return tok


class HFTokenizer(_IdsTokenizer):
    """A local Hugging Face tokenizer (`load_hf_tokenizer`). layout=navit: [bos] ids [eos] as the
    other tokenizers; layout=hf: the tokenizer's own call (its special tokens, padding to the
    context, truncation), which is what open_clip's HFTokenizer returns (SigLIP's checkpoints)."""

    def __init__(self, path: str | Path, context_length: int, layout: str = "navit", clean: str = "none"):
        self.tok = load_hf_tokenizer(path)
        self.layout, self.clean = layout, clean_fn(clean)
        self.context_length = context_length
        if layout == "hf" and self.tok.pad_token_id is None:
            raise ValueError(
                f"Hugging Face tokenizer {path} names no padding token; give the folder with its "
                "tokenizer_config.json (special_tokens_map.json)"
            )
        vocab = len(self.tok)
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else vocab
        self.num_embeddings = vocab if self.tok.pad_token_id is not None else vocab + 1
        self.bos_id = self.tok.bos_token_id if self.tok.bos_token_id != self.tok.eos_token_id else None
        self.eos_id = self.tok.eos_token_id if self.tok.eos_token_id is not None else self.tok.sep_token_id

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def __call__(self, texts: list[str]) -> torch.Tensor:
        if self.layout != "hf":
            return super().__call__(texts)
        return self.tok(
            self._cleaned(texts),
            return_tensors="pt",
            max_length=self.context_length,
            padding="max_length",
            truncation=True,
        ).input_ids


def tokenizer_for(cfg, fixed_vocab: bool = False):
    """The tokenizer a `Config` names, with its pad id (and vocabulary size) written into
    `cfg.model.text` (the one place the text tower learns them). With `fixed_vocab` (a model whose
    weights exist: a checkpoint, model.init_from) the embedding table keeps its size and the
    tokenizer must fit in it."""
    t = cfg.tokenizer
    tokenizer = build_tokenizer(t.kind, t.path, t.context_length, t.layout, t.clean, t.pad_with_eos, t.source)
    text = cfg.model.text
    if fixed_vocab and tokenizer.num_embeddings > text.vocab_size:
        raise ValueError(
            f"tokenizer {t.path or t.kind} has {tokenizer.num_embeddings} ids but the model's text tower "
            f"embeds {text.vocab_size}: it is not this checkpoint's tokenizer"
        )
    if not fixed_vocab:
        text.vocab_size = tokenizer.num_embeddings
    text.pad_id = tokenizer.pad_id
    # trailing padding may be cut only where the tower never reads it (causal, pooled at the last
    # non-padding token or over the real tokens): pool=argmax / eos may read a pad id that is the eos
    tokenizer.trim_padding = text.causal and text.pool in ("eot", "map")
    return tokenizer


def build_tokenizer(
    kind: str,
    path: str = "",
    context_length: int = 32,
    layout: str = "navit",
    clean: str = "none",
    pad_with_eos: bool = False,
    source: str = "",
):
    """A tokenizer of `kind`; hf and sentencepiece read the local file at `path` (a `.model` file is
    SentencePiece whichever of the two is named). `source` names where a checkpoint's tokenizer comes
    from, for the error when no path is given."""
    if kind == "openclip":
        return OpenCLIPTokenizer(context_length)
    if kind not in ("sentencepiece", "hf"):
        raise ValueError(f"tokenizer kind {kind!r} must be openclip, sentencepiece or hf")
    if not path:
        whose = f" (this checkpoint's: {source})" if source else ""
        raise ValueError(
            f"tokenizer.kind={kind} needs tokenizer.path{whose}: a local Hugging Face tokenizer folder, "
            "tokenizer.json or SentencePiece .model file (nothing is downloaded)"
        )
    if str(path).endswith(".model"):
        return SentencePieceTokenizer(path, context_length, pad_with_eos, clean)
    return HFTokenizer(path, context_length, layout, clean)


def train_sentencepiece(captions: Iterable[str], out_prefix: str | Path, vocab_size: int = 32000) -> Path:
    """Train a unigram SentencePiece model on captions -> OUT_PREFIX.model (pad id 0, eos id 2)."""
    import sentencepiece as spm

    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions),
        model_prefix=str(out_prefix),
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        unk_id=1,
        eos_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return out_prefix.with_suffix(".model")


def write_clip_tokenizer(folder: str | Path, context_length: int, pad_token: str = "!"):
    """open_clip's BPE as transformers' CLIPTokenizer in `folder` (vocab.json, merges.txt and the
    tokenizer's own files): the same ids as OpenCLIPTokenizer for the same text, padded with `pad_token`
    ("!", id 0, as open_clip pads; "<|endoftext|>" as openai's transformers tokenizer does) to
    `context_length`. What `navit-clip export --format hf --with-text` ships for a model trained with
    open_clip's BPE."""
    import json

    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    inner = SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # transformers' names
    vocab = {names.get(token, token): i for token, i in inner.encoder.items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    merges = sorted(inner.bpe_ranks, key=inner.bpe_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    settings = {
        "tokenizer_class": "CLIPTokenizer",
        "pad_token": pad_token,
        "model_max_length": context_length,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)  # reads vocab.json + merges.txt
    tok.save_pretrained(folder)
    return tok
