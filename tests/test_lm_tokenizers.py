"""--tokenizer-model for every language-model family, built locally (no download): the ids
equal transformers' AutoTokenizer on Phi-2-style (CodeGen, GPT-2 BPE), StableLM-2-style
(GPT-2 BPE with Arcade100k's special tokens) and Qwen2-style directories; Qwen-1's
``qwen.tiktoken`` and MoE-LLaVA's ``arcade100k.tiktoken`` (read without tiktoken or remote
code) equal a slow encoder that follows tiktoken's rules. A tokenizer that does not fit the
pretrained checkpoint's embedding is an error naming both sizes."""

from __future__ import annotations

import base64
import math
import os
import unicodedata
from collections import Counter

import pytest
import regex
import torch

from megatron_stgc.data.tiktoken_bpe import EOS, FORMATS, PATTERN
from megatron_stgc.data.tokenizer import HFTokenizer, load_tokenizer

CORPUS = ["Which digit is shown? It is seven; the answer's 7, not 1.",
          "The quick brown fox jumps over the lazy dog 1234567890 times!",
          "naïve café, Straße, 你好世界, ελληνικά, emoji 🙂 and tabs\tand\nnew lines\n\n",
          "def f(x):\n    return x ** 2  # we'll see, they're fine, I've, you'd"] * 8
TEXTS = ["Which digit is shown?", "It's 42 -- the answer<|endoftext|>next", " leading  spaces ",
         "naïve café 你好 🙂", "line one\n\nline two\r\n", "<|im_start|>user\nhi<|im_end|>",
         "unseen zebra quokka", "Nai\u0308ve decomposed", ""]


# ---- Hugging Face tokenizer directories, one per family ------------------------------------

def trained_bpe():
    """(vocab, merges) of a tiny byte-level BPE trained on CORPUS with the tokenizers library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(CORPUS, trainer)
    model = raw.to_str()
    import json

    bpe = json.loads(model)["model"]
    return bpe["vocab"], [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                          for m in bpe["merges"]]


def phi2_dir(path):
    """Phi-2 ships CodeGenTokenizer (GPT-2's BPE) with <|endoftext|> as EOS."""
    from transformers import CodeGenTokenizer

    vocab, merges = trained_bpe()
    CodeGenTokenizer(vocab=vocab, merges=merges).save_pretrained(str(path))
    return path


def stablelm2_dir(path):
    """StableLM-2's Hugging Face tokenizer: GPT-2-style BPE plus Arcade100k's special tokens."""
    from transformers import GPT2Tokenizer

    vocab, merges = trained_bpe()
    tok = GPT2Tokenizer(vocab=vocab, merges=merges, eos_token=EOS, bos_token=EOS)
    tok.add_special_tokens({"additional_special_tokens": list(
        FORMATS["arcade100k.tiktoken"].special_tokens[1:])})
    tok.save_pretrained(str(path))
    return path


def qwen2_dir(path):
    from transformers import Qwen2Tokenizer

    vocab, merges = trained_bpe()
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.save_pretrained(str(path))
    return path


@pytest.mark.parametrize("family", ["phi2", "stablelm2", "qwen2"])
def test_hf_directory_ids_equal_autotokenizer(family, tmp_path):
    from transformers import AutoTokenizer

    path = {"phi2": phi2_dir, "stablelm2": stablelm2_dir, "qwen2": qwen2_dir}[family](tmp_path)
    ours = load_tokenizer(str(path))
    reference = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    assert isinstance(ours, HFTokenizer)
    for text in TEXTS:
        assert ours.encode(text) == reference.encode(text, add_special_tokens=False), text
    assert ours.eos_id == reference.convert_tokens_to_ids(EOS)
    assert ours.vocab_size == max(reference.get_vocab().values()) + 1  # the image token's id
    assert ours.decode(ours.encode("Which digit is shown?")) == "Which digit is shown?"


# ---- tiktoken files (Qwen-1, MoE-LLaVA's StableLM-2) ----------------------------------------

def byte_level_ranks(corpus: list[str], merges: int = 250) -> dict[bytes, int]:
    """A tiktoken rank table trained the obvious way: the 256 bytes, then the most frequent
    adjacent pair within the pattern's pieces, merged ``merges`` times."""
    pieces = Counter(piece.encode() for text in corpus for piece in regex.findall(PATTERN, text))
    words = {piece: [bytes([b]) for b in piece] for piece in pieces}
    ranks = {bytes([b]): b for b in range(256)}
    for _ in range(merges):
        pairs = Counter()
        for piece, parts in words.items():
            for a, b in zip(parts, parts[1:]):
                pairs[a, b] += pieces[piece]
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda item: (item[1], item[0]))
        ranks[a + b] = len(ranks)
        for parts in words.values():
            i = 0
            while i < len(parts) - 1:
                if parts[i] == a and parts[i + 1] == b:
                    parts[i:i + 2] = [a + b]
                i += 1
    return ranks


def write_tiktoken(path, ranks: dict[bytes, int]) -> str:
    with open(path, "w") as f:
        for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
    return str(path)


def tiktoken_rule_encode(text: str, ranks: dict[bytes, int], specials: dict[str, int]) -> list:
    """Qwen-1 / Arcade100k's encode, the slow way: NFC; special tokens anywhere; the pattern's
    pieces; a piece that is a token is that token, else join the adjacent pair of lowest rank
    until none is a token."""
    text = unicodedata.normalize("NFC", text)
    alternatives = "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True))
    ids = []
    for chunk in regex.split(f"({alternatives})", text):
        if chunk in specials:
            ids.append(specials[chunk])
            continue
        for piece in regex.findall(PATTERN, chunk):
            data = piece.encode()
            if data in ranks:
                ids.append(ranks[data])
                continue
            parts = [bytes([b]) for b in data]
            while len(parts) > 1:
                rank, i = min((ranks.get(parts[j] + parts[j + 1], math.inf), j)
                              for j in range(len(parts) - 1))
                if rank == math.inf:
                    break
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            ids += [ranks[part] for part in parts]
    return ids


@pytest.fixture(scope="module")
def ranks():
    return byte_level_ranks(CORPUS)


def scrambled_words(count: int = 300) -> list[str]:
    """Words spliced from slices of the corpus's words ("hichthe", "quickown"): pieces that
    are no token, where the order in which BPE joins overlapping pairs decides the ids."""
    generator = torch.Generator().manual_seed(4)
    words = sorted({w for text in CORPUS for w in regex.findall(r"\p{L}{3,}", text)})
    picks = torch.randint(0, 1000, (count, 9), generator=generator).tolist()
    spliced = []
    for row in picks:
        parts = []
        for j in range(2 + row[0] % 3):
            word = words[row[1 + 2 * j] % len(words)]
            start = row[2 + 2 * j] % (len(word) - 1)
            parts.append(word[start:start + 2 + row[1 + 2 * j] % 4])
        spliced.append(("" if row[8] % 2 else " ") + "".join(parts))
    return spliced


@pytest.mark.parametrize("name", list(FORMATS))
def test_tiktoken_file_ids_follow_tiktoken_rules(name, ranks, tmp_path):
    fmt = FORMATS[name]
    specials = {token: fmt.special_start + i for i, token in enumerate(fmt.special_tokens)}
    path = write_tiktoken(tmp_path / name, ranks)
    for source in (path, str(tmp_path)):  # the file, or its directory (no tokenizer.json)
        ours = load_tokenizer(source)
        for text in TEXTS + CORPUS[:4] + scrambled_words():
            assert ours.encode(text) == tiktoken_rule_encode(text, ranks, specials), text
        assert ours.eos_id == specials[EOS]
        assert ours.vocab_size == max(specials.values()) + 1  # past the gap before specials
        assert ours.decode(ours.encode("naïve café 你好 🙂")) == "naïve café 你好 🙂"


def test_bad_tiktoken_files_are_named(ranks, tmp_path):
    path = write_tiktoken(tmp_path / "qwen.tiktoken", ranks)
    with open(path, "a") as f:
        f.write("not-base64!! 9999\n")
    with pytest.raises(ValueError, match=r"qwen.tiktoken:\d+: expected 'base64-token rank'"):
        load_tokenizer(path)
    other = write_tiktoken(tmp_path / "cl100k_base.tiktoken", ranks)
    with pytest.raises(ValueError, match="unknown tiktoken file"):
        load_tokenizer(other)


# ---- the tokenizer must fit the pretrained embedding ---------------------------------------

def test_tokenizer_larger_than_the_embedding_is_an_error(tmp_path):
    from megatron_stgc.config import ConfigError, config_from_flat
    from megatron_stgc.model.pretrained import fitted_vocab_rows

    os.makedirs(tmp_path / "ckpt")
    torch.save({"model": {"language_model.embedding.word_embeddings.weight": torch.zeros(384, 8)}},
               tmp_path / "ckpt" / "model.pt")
    config = config_from_flat({"pretrained_checkpoint": str(tmp_path / "ckpt"),
                               "tokenizer_model": "/models/phi-2"})
    assert fitted_vocab_rows(config, 383, 1) == 384  # 383 ids + the image token fit exactly
    with pytest.raises(ConfigError, match=r"--tokenizer-model /models/phi-2: its 384 ids \+ 1 "
                                          r"image token = 385 do not fit the 384 embedding rows"):
        fitted_vocab_rows(config, 384, 1)
