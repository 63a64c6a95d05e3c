"""tiktoken BPE files as Hugging Face fast tokenizers, without tiktoken and without remote code.

Two of the language models MoE-LLaVA uses ship their vocabulary only as a tiktoken rank file
read by remote code: Qwen-1 (``qwen.tiktoken``, MoE-LLaVA's copy of the tokenizer:
moellava/model/language_model/qwen/tokenization_qwen.py, cited as tq:LINE) and StableLM-2 as
MoE-LLaVA loads it (``arcade100k.tiktoken``,
moellava/model/language_model/stablelm/tokenization_arcade100k.py, cited as ta:LINE;
moellava/model/builder.py:162 loads it for StableLM). The file is one ``base64(token bytes)
rank`` per line (tq:48-55). ``tiktoken_tokenizer(path)`` reads it and builds the equivalent
byte-level BPE of the ``tokenizers`` library:

* vocabulary: each token's bytes in GPT-2's byte-to-unicode alphabet, id = rank;
* merges: for every token of two or more bytes, the pair BPE joins last when it encodes that
  token with the lower ranks only (tiktoken always joins the adjacent pair whose result has
  the lowest rank, so the merge order is the rank order); ``ignore_merges``: a piece that is
  itself a token is that token, as tiktoken does;
* pre-tokenization: the format's regular expression (both files use the same one, tq:22,
  ta:84), then bytes; NFC normalisation first (tq:205, ta:213);
* special tokens at the ids the remote code gives them (tq:23-45: from 151643;
  ta:32-76: from 100257), matched anywhere in the text (both tokenizers' ``allowed_special
  ="all"`` default, tq:184, ta:189). EOS is ``<|endoftext|>`` (the eod / eot token, ta:127).

tests/test_hf_tokenizer.py checks the ids against a slow, obvious tiktoken-rule encoder.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass

EOS = "<|endoftext|>"
# tq:22 and ta:84 (the same expression)
PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"""
           r"""[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


@dataclass(frozen=True)
class TiktokenFormat:
    special_tokens: tuple[str, ...]
    special_start: int  # the id of special_tokens[0]; the rest follow


FORMATS = {
    # tq:23-44: endoftext, im_start, im_end, then 205 extras, from id 151643 (tq:31)
    "qwen.tiktoken": TiktokenFormat(
        (EOS, "<|im_start|>", "<|im_end|>") + tuple(f"<|extra_{i}|>" for i in range(205)),
        151643),
    # ta:32-76: endoftext, FIM, StarCoder, endofprompt, chat, pause, registers, extra0, from 100257
    "arcade100k.tiktoken": TiktokenFormat(
        (EOS, "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
         "<gh_stars>", "<filename>", "<issue_start>", "<issue_comment>", "<issue_closed>",
         "<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>",
         "<empty_output>", "<commit_before>", "<commit_msg>", "<commit_after>", "<reponame>",
         "<|endofprompt|>", "<|im_start|>", "<|im_end|>", "<|pause|>")
        + tuple(f"<|reg{i}|>" for i in range(8)) + ("<|extra0|>",),
        100257),
}


def tiktoken_file_in(directory: str) -> str | None:
    """The known tiktoken file in ``directory``, if there is one."""
    for name in FORMATS:
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    return None


def read_ranks(path: str) -> dict[bytes, int]:
    """{token bytes: rank}; a malformed line or a repeated rank names the file and line."""
    ranks: dict[bytes, int] = {}
    seen: set[int] = set()
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token_text, rank_text = line.split()
                token, rank = base64.b64decode(token_text, validate=True), int(rank_text)
            except (ValueError, binascii.Error):
                raise ValueError(f"{path}:{number}: expected 'base64-token rank', got "
                                 f"{line[:60]!r}") from None
            if rank in seen or token in ranks:
                raise ValueError(f"{path}:{number}: token or rank {rank} appears twice")
            seen.add(rank)
            ranks[token] = rank
    return ranks


def byte_alphabet() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte (what ByteLevel pre-tokenization emits):
    printable Latin-1 bytes stand for themselves, the others for chr(256 + n) in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    alphabet, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            alphabet[byte] = chr(byte)
        else:
            alphabet[byte] = chr(256 + extra)
            extra += 1
    return alphabet


def last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two parts BPE joins last when it builds ``token`` from lower-ranked tokens."""
    limit = ranks[token]
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        pairs = [(ranks.get(parts[i] + parts[i + 1], limit), i) for i in range(len(parts) - 1)]
        rank, i = min(pairs)
        if rank >= limit:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {limit}) is not the join of two lower-ranked "
                         "tokens: not a BPE rank file")
    return parts[0], parts[1]


def tiktoken_tokenizer(path: str):
    """A transformers fast tokenizer with the ids of the remote-code tokenizer of ``path``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    name = os.path.basename(path)
    if name not in FORMATS:
        raise ValueError(f"--tokenizer-model {path}: unknown tiktoken file (known: "
                         f"{', '.join(FORMATS)}); its special tokens and their ids are not known")
    fmt = FORMATS[name]
    ranks = read_ranks(path)
    alphabet = byte_alphabet()

    def text(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = [(text(a), text(b)) for a, b in (
        last_merge(token, ranks) for token in sorted(ranks, key=ranks.get) if len(token) > 1)]
    specials = {token: fmt.special_start + i for i, token in enumerate(fmt.special_tokens)}
    clash = sorted(set(specials.values()) & set(ranks.values()))
    if clash:
        raise ValueError(f"{path}: ranks {clash[:4]} collide with the special token ids")
    raw = Tokenizer(models.BPE({**vocab, **specials}, merges, ignore_merges=True))
    raw.normalizer = normalizers.NFC()
    raw.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens([AddedToken(token, special=True, normalized=False)
                            for token in fmt.special_tokens])
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=EOS, pad_token=EOS)
