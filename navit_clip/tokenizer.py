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


class _IdsTokenizer:
    """Shared layout for tokenizers that produce id lists: [bos] ids [eos], truncated, padded."""

    context_length: int
    pad_id: int
    bos_id: int | None
    eos_id: int | None

    def _encode(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def __call__(self, texts: list[str]) -> torch.Tensor:
        K = self.context_length
        out = torch.full((len(texts), K), self.pad_id, dtype=torch.long)
        head = [self.bos_id] if self.bos_id is not None else []
        tail = [self.eos_id] if self.eos_id is not None else []
        for i, ids in enumerate(self._encode(texts)):
            ids = (head + ids)[: K - len(tail)] + tail
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


class SentencePieceTokenizer(_IdsTokenizer):
    """A SentencePiece model file. Without a pad piece, padding gets an extra embedding row."""

    def __init__(self, model_file: str | Path, context_length: int):
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

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)


class HFTokenizer(_IdsTokenizer):
    """Any tokenizer folder transformers can load, read with local_files_only (never downloads)."""

    def __init__(self, path: str | Path, context_length: int):
        from transformers import AutoTokenizer

        if not Path(path).exists():
            raise ValueError(f"Hugging Face tokenizer folder {path} does not exist (nothing is downloaded)")
        self.tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.context_length = context_length
        vocab = len(self.tok)
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else vocab
        self.num_embeddings = vocab if self.tok.pad_token_id is not None else vocab + 1
        self.bos_id = self.tok.bos_token_id if self.tok.bos_token_id != self.tok.eos_token_id else None
        self.eos_id = self.tok.eos_token_id if self.tok.eos_token_id is not None else self.tok.sep_token_id

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=False)["input_ids"]


def tokenizer_for(cfg):
    """The tokenizer a `Config` names, with its vocabulary size and pad id written into
    `cfg.model.text` (the one place the text tower's embedding table learns them)."""
    tokenizer = build_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path, cfg.tokenizer.context_length)
    cfg.model.text.vocab_size, cfg.model.text.pad_id = tokenizer.num_embeddings, tokenizer.pad_id
    return tokenizer


def build_tokenizer(kind: str, path: str = "", context_length: int = 32):
    if kind == "openclip":
        return OpenCLIPTokenizer(context_length)
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path, context_length)
    if kind == "hf":
        return HFTokenizer(path, context_length)
    raise ValueError(f"tokenizer kind {kind!r} must be openclip, sentencepiece or hf")


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
