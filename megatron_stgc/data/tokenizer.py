"""Tokenizers: SentencePiece (load one, or train one on the data at first run, cached), or a
Hugging Face tokenizer directory (a converted model's own tokenizer, e.g. StableLM-2's BPE).

``load_tokenizer(path)`` picks by what ``path`` is: a directory (or a ``tokenizer.json``)
-> ``HFTokenizer`` (local files only, no download); a ``qwen.tiktoken`` /
``arcade100k.tiktoken`` file, or a directory holding one and no ``tokenizer.json`` (Qwen-1,
MoE-LLaVA's StableLM-2) -> ``HFTokenizer`` over data/tiktoken_bpe.py's conversion (no
remote code); anything else -> a SentencePiece model.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from typing import Iterable

import sentencepiece as spm

from megatron_stgc.data.instruct_text import ASSISTANT_TAG, USER_TAG


class Tokenizer:
    """Thin wrapper over a SentencePiece model with the ids training needs."""

    def __init__(self, model_path: str):
        self.model_path = model_path
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


class HFTokenizer:
    """A Hugging Face tokenizer from local files, with the interface of ``Tokenizer``
    (``tok``: an already built transformers tokenizer for ``path``, e.g. a tiktoken file's)."""

    def __init__(self, path: str, tok=None):
        self.model_path = path
        self.tok = tok if tok is not None else _transformers_tokenizer(path)
        if self.tok.eos_token_id is None:
            raise ValueError(f"--tokenizer-model {path}: the tokenizer defines no EOS token")
        self.eos_id = self.tok.eos_token_id
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id
        # one past the largest id: vocabularies with gaps (Arcade100k has no id 100256) and
        # added tokens counted, so the image token id (this number) is nobody's token
        self._vocab_size = max(len(self.tok), max(self.tok.get_vocab().values()) + 1)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def _transformers_tokenizer(path: str):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if not os.path.isdir(path):
        return PreTrainedTokenizerFast(tokenizer_file=path)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"--tokenizer-model {path}: transformers cannot load a tokenizer from "
                         f"this directory without remote code ({error}); give a directory with "
                         "tokenizer.json, a qwen.tiktoken / arcade100k.tiktoken file, or a "
                         "SentencePiece .model") from None


def load_tokenizer(path: str):
    """--tokenizer-model: a Hugging Face tokenizer directory / tokenizer.json, a tiktoken
    file (or a directory with one and no tokenizer.json), or SentencePiece."""
    from megatron_stgc.data.tiktoken_bpe import tiktoken_file_in, tiktoken_tokenizer

    tiktoken_file = path if path.endswith(".tiktoken") else None
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "tokenizer.json")):
        tiktoken_file = tiktoken_file_in(path)
    if tiktoken_file is not None:
        return HFTokenizer(tiktoken_file, tiktoken_tokenizer(tiktoken_file))
    if os.path.isdir(path) or path.endswith(".json"):
        return HFTokenizer(path)
    return Tokenizer(path)


def cached_tokenizer_path(cache_dir: str, texts_fingerprint: str, vocab_size: int) -> str:
    key = hashlib.sha256(f"{texts_fingerprint}-{vocab_size}".encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"spm-{vocab_size}-{key}.model")


def fingerprint(texts: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:  # records are validated at the index; surrogatepass never raises
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()


def train_tokenizer(texts: list[str], vocab_size: int, output_path: str) -> str:
    """Train a BPE SentencePiece model on ``texts``; publish it at ``output_path`` atomically."""
    os.makedirs(os.path.dirname(output_path) or ".", exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        user_defined_symbols=[USER_TAG, ASSISTANT_TAG],
        pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
        split_digits=True,
    )
    handle, tmp_path = tempfile.mkstemp(dir=os.path.dirname(output_path) or ".", suffix=".tmp")
    with os.fdopen(handle, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp_path, output_path)
    return output_path


def get_or_train_tokenizer(texts: list[str], vocab_size: int, cache_dir: str) -> Tokenizer:
    """The tokenizer cached for these texts and vocab size; trained on first use."""
    path = cached_tokenizer_path(cache_dir, fingerprint(texts), vocab_size)
    if not os.path.isfile(path):
        train_tokenizer(texts, vocab_size, path)
    return Tokenizer(path)
