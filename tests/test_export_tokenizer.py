"""The exported tokenizer: our SentencePiece model as a transformers tokenizer with the same ids.

SentencePiece itself is the reference: every text of the digits mix (train conversations and
validation questions) and hand-picked edge cases (user-defined symbols inside words, runs of
spaces, newlines, NFKC-normalised and unknown characters, empty text) must encode to the same
ids, and random id sequences must decode to the same text. Also: the protobuf reader against
SentencePiece's own accessors, the fused-QKV inverse, and the refusal of what the conversion
does not reproduce (byte fallback).
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from megatron_stgc.convert import fuse_qkv
from megatron_stgc.data.digits import build_digits_mix
from megatron_stgc.data.tokenizer import Tokenizer, train_tokenizer
from megatron_stgc.export.lm_export import ExportError, unfuse_qkv
from megatron_stgc.export.spm_hf import spm_to_tokenizers, transformers_tokenizer
from megatron_stgc.export.spm_proto import CONTROL, USER_DEFINED, read_spm_model
from megatron_stgc.data.instruct_text import format_prompt

EDGE_CASES = ["<|user|>", "<|user|> ", "Which digit is shown?\n<|assistant|> ", " hi  there ",
              "\n", "a\nb", "x<|user|>y", "café ½ Ω 😀😀 ab", "12345", "", "   ", "a\t\tb",
              "ＡＢＣ", "x  <|assistant|>  y", "<|assistant|><|user|>", "é", "😀"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    mix = build_digits_mix(str(root / "data"))
    with open(mix["train"]) as f:
        records = json.load(f)
    texts = [turn["value"] for record in records for turn in record["conversations"]]
    with open(mix["val_questions"]) as f:
        texts += [json.loads(line)["text"] for line in f]
    prompts = [format_prompt(text) for text in texts[:2000]]
    model = train_tokenizer(prompts + texts, 512, str(root / "spm.model"))
    return {"texts": texts + prompts, "model": model, "root": root}


def test_encode_gives_sentencepiece_ids(digits):
    sp = Tokenizer(digits["model"])
    hf = transformers_tokenizer(sp)
    texts = digits["texts"] + EDGE_CASES
    wrong = [(t, sp.encode(t), hf.encode(t, add_special_tokens=False)) for t in texts
             if sp.encode(t) != hf.encode(t, add_special_tokens=False)]
    assert wrong == [], wrong[:5]
    assert sp.encode("x<|user|>y") == hf.encode("x<|user|>y", add_special_tokens=False)
    assert len(set(map(tuple, map(sp.encode, EDGE_CASES)))) > 10  # the cases differ


def test_decode_gives_sentencepiece_text(digits):
    sp = Tokenizer(digits["model"])
    hf = transformers_tokenizer(sp)
    rng = random.Random(0)
    for _ in range(5000):
        ids = [rng.randrange(sp.vocab_size) for _ in range(rng.randrange(1, 10))]
        ids = [3 if rng.random() < 0.05 else i for i in ids]  # EOS (a control piece) too
        assert hf.decode(ids, skip_special_tokens=True) == sp.decode(ids), ids
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == (sp.eos_id, sp.pad_id, 2)


def test_protobuf_reader_matches_sentencepiece(digits):
    sp = Tokenizer(digits["model"]).sp
    model = read_spm_model(digits["model"])
    assert len(model.pieces) == sp.get_piece_size()
    for i, piece in enumerate(model.pieces):
        assert piece.piece == sp.id_to_piece(i)
        assert piece.score == pytest.approx(sp.get_score(i))
        assert (piece.type == CONTROL) == sp.is_control(i)
        assert (piece.type == USER_DEFINED) == (piece.piece in ("<|user|>", "<|assistant|>"))
    assert model.normalizer_name == "nmt_nfkc" and model.precompiled_charsmap
    assert model.add_dummy_prefix and model.remove_extra_whitespaces


def test_byte_fallback_models_are_refused(digits, tmp_path):
    import sentencepiece as spm

    path = str(tmp_path / "bf.model")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(digits["texts"][:3000]),
                                   model_prefix=str(tmp_path / "bf"), vocab_size=600,
                                   model_type="bpe", byte_fallback=True, minloglevel=2)
    with pytest.raises(ExportError, match="byte_fallback"):
        spm_to_tokenizers(path)


@pytest.mark.parametrize("heads,groups", [(4, 4), (8, 2), (6, 1)])
def test_unfuse_qkv_inverts_fuse_qkv(heads, groups):
    d, h = 3, 5
    q, k, v = (torch.randn(n * d, h) for n in (heads, groups, groups))
    fused = fuse_qkv(q, k, v, heads, groups)
    for got, want in zip(unfuse_qkv(fused, heads, groups), (q, k, v)):
        assert torch.equal(got, want)
    bias = fuse_qkv(q[:, 0], k[:, 0], v[:, 0], heads, groups)
    assert all(torch.equal(a, b[:, 0]) for a, b in zip(unfuse_qkv(bias, heads, groups),
                                                         (q, k, v)))
