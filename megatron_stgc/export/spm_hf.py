"""A SentencePiece BPE model -> a ``tokenizers`` tokenizer that gives the same ids.

What SentencePiece does when it encodes (read from its behaviour on our models; the
normalizer settings come from the file, ``spm_proto.py``):

1. normalize: the precompiled character map (``nmt_nfkc`` by default: NFKC plus NMT rules,
   newlines and tabs become spaces); with ``remove_extra_whitespaces`` leading and trailing
   spaces go and inner runs of spaces become one; with ``add_dummy_prefix`` a space is put in
   front of non-empty text; spaces are written as "▁".
2. user-defined symbols (ours: ``<|user|>``, ``<|assistant|>``) are matched as whole pieces in
   the normalized text; control pieces (``<pad>``, ``<s>``, ``</s>``) never come from text.
3. BPE: starting from characters, the adjacent pair whose concatenation is the piece of
   highest score is merged, leftmost first, until no pair forms a piece; characters that are
   no piece become ``<unk>``, a run of them one ``<unk>``.

The copy: normalizers ``Precompiled`` (the same map), ``Strip``, ``Replace`` (runs of
spaces), ``Prepend(" ")`` (tokenizers prepends nothing to empty text), ``Replace(" ", "▁")``;
a pre-tokenizer that isolates the user-defined pieces in the normalized text (so the dummy
"▁" before a leading ``<|user|>`` stays its own token, as in SentencePiece; added tokens
would be matched before the prefix, or with the prefix inside them); a BPE model whose
merges are every split of every piece into two pieces, ranked by the merged piece's score
(so "lowest rank first" is "highest score first"), ``fuse_unk``, and ``ignore_merges`` (a
segment that is a whole piece is that piece: how ``<|user|>`` keeps its id; every normal
piece is checked to be what its own merges make of it, so this never changes an id).
Decoding: "▁" -> space, the leading spaces dropped (SentencePiece drops the dummy prefix and
any "▁" pieces before the first other one), ``<unk>`` written as
SentencePiece's ``unk_surface`` (" ⁇ "). Control pieces are special tokens (skipped when
decoding with ``skip_special_tokens``, as SentencePiece always skips them). tests/test_export_tokenizer.py compares ids and decoded text with
SentencePiece on the digits mix and on edge cases.

Only what our tokenizers use is supported (a BPE model with escaped whitespace and no byte
fallback); anything else is an ExportError naming the file and the setting.
"""

from __future__ import annotations

from megatron_stgc.export.lm_export import ExportError
from megatron_stgc.export.spm_proto import (BPE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED,
                                            read_spm_model)

SPACE = "\u2581"  # "▁"
LEADING_SPACES = 1 << 20  # "all" for the Strip decoder (it takes a count)


def _check(model, path: str) -> None:
    problems = []
    if model.model_type != BPE:
        problems.append(f"model type {model.model_type} (only BPE, 2)")
    if model.byte_fallback:
        problems.append("byte_fallback")
    if model.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix")
    if not model.escape_whitespaces:
        problems.append("escape_whitespaces false")
    if problems:
        raise ExportError(f"SentencePiece model {path}: cannot be written as a transformers "
                          f"tokenizer with the same ids: {', '.join(problems)}")


def _merges(pieces, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every (left, right) whose concatenation is a normal piece, best merged score first."""
    ranked = []
    for index, piece in enumerate(pieces):
        if piece.type != NORMAL or len(piece.piece) < 2:
            continue
        for cut in range(1, len(piece.piece)):
            left, right = piece.piece[:cut], piece.piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-piece.score, index, left, right))
    ranked.sort()
    return [(left, right) for _, _, left, right in ranked]


def _normalizer(model):
    from tokenizers import Regex, normalizers

    steps = []
    if model.precompiled_charsmap:
        steps.append(normalizers.Precompiled(model.precompiled_charsmap))
    if model.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True),
                  normalizers.Replace(Regex(" {2,}"), " ")]
    if model.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))
    steps.append(normalizers.Replace(" ", SPACE))
    return normalizers.Sequence(steps)


def _decoder(model, unk_piece: str):
    from tokenizers import decoders

    steps = [decoders.Replace(SPACE, " "), decoders.Fuse()]
    if model.add_dummy_prefix:  # leading spaces, as SentencePiece drops leading "▁" pieces
        steps.append(decoders.Strip(content=" ", left=LEADING_SPACES, right=0))  # (not <unk>'s)
    steps.append(decoders.Replace(unk_piece, model.unk_surface))
    return decoders.Sequence(steps)


def _symbol_splitter(user: list[str]):
    """A pre-tokenizer that isolates the user-defined pieces in the normalized text."""
    import re

    from tokenizers import Regex, pre_tokenizers

    pattern = "|".join(re.escape(piece) for piece in sorted(user, key=len, reverse=True))
    return pre_tokenizers.Split(Regex(pattern), behavior="isolated")


def _check_reachable(pieces, vocab, merges, unk: str, path: str) -> None:
    """``ignore_merges`` takes a segment that is a whole piece as that piece; SentencePiece's
    merges must reach the same piece from its characters (true of trained BPE models; checked
    with the merges alone, so the shortcut never changes an id)."""
    from tokenizers import Tokenizer, models

    merges_only = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk,
                                       fuse_unk=True))
    for piece in pieces:
        if piece.type != NORMAL:
            continue
        got = merges_only.model.tokenize(piece.piece)
        if [t.value for t in got] != [piece.piece]:
            raise ExportError(f"SentencePiece model {path}: piece {piece.piece!r} is not what "
                              f"its own merges make of it ({[t.value for t in got]}); its ids "
                              "cannot be reproduced with a tokenizers BPE")


def spm_to_tokenizers(path: str):
    """(tokenizers.Tokenizer, {"unk", "control": [pieces], "user_defined": [pieces]})."""
    from tokenizers import AddedToken, Tokenizer, models

    model = read_spm_model(path)
    _check(model, path)
    vocab = {piece.piece: i for i, piece in enumerate(model.pieces)}
    unk = next((p.piece for p in model.pieces if p.type == UNKNOWN), None)
    if unk is None:
        raise ExportError(f"SentencePiece model {path}: no unknown piece")
    merges = _merges(model.pieces, vocab)
    _check_reachable(model.pieces, vocab, merges, unk, path)
    # ignore_merges: a pre-tokenized segment that is a whole piece is taken as it is (how the
    # user-defined pieces, which no merge builds, keep their ids)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                               byte_fallback=False, ignore_merges=True))
    tok.normalizer = _normalizer(model)
    tok.decoder = _decoder(model, unk)
    user = [p.piece for p in model.pieces if p.type == USER_DEFINED]
    if user:
        tok.pre_tokenizer = _symbol_splitter(user)
    control = [p.piece for p in model.pieces if p.type == CONTROL]
    tok.add_special_tokens([AddedToken(piece, normalized=False, special=True)
                            for piece in control])
    return tok, {"unk": unk, "control": control, "user_defined": user}


def transformers_tokenizer(sp_tokenizer):
    """Our SentencePiece ``Tokenizer`` (data/tokenizer.py) -> a transformers fast tokenizer
    with its ids; bos / eos / pad as the SentencePiece model defines them."""
    from transformers import PreTrainedTokenizerFast

    tok, _ = spm_to_tokenizers(sp_tokenizer.model_path)
    sp = sp_tokenizer.sp
    special = {}
    for name, index in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()),
                        ("pad_token", sp.pad_id())):
        if index >= 0:
            special[name] = sp.id_to_piece(index)
    if "pad_token" not in special:  # our Tokenizer pads with EOS then
        special["pad_token"] = special.get("eos_token")
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False,
                                   **special)
