"""Read the fields of a SentencePiece ``.model`` file that a tokenizers-library copy needs.

A ``.model`` file is a serialized ``sentencepiece.ModelProto`` (protocol buffers, proto2).
The ``sentencepiece`` package reads it only through its generated ``google.protobuf`` module,
which is not a dependency here, so this module decodes the wire format itself (varint keys,
length-delimited and fixed32 fields). Field numbers, from the descriptor in
``sentencepiece/sentencepiece_model_pb2.py`` (sentencepiece_model.proto)::

    ModelProto      1 pieces (repeated SentencePiece), 2 trainer_spec, 3 normalizer_spec
    SentencePiece   1 piece (string), 2 score (float), 3 type (enum: 1 NORMAL, 2 UNKNOWN,
                    3 CONTROL, 4 USER_DEFINED, 5 UNUSED, 6 BYTE)
    TrainerSpec     3 model_type (1 UNIGRAM, 2 BPE, 3 WORD, 4 CHAR), 24
                    treat_whitespace_as_suffix, 35 byte_fallback, 44 unk_surface
    NormalizerSpec  1 name, 2 precompiled_charsmap (bytes), 3 add_dummy_prefix,
                    4 remove_extra_whitespaces, 5 escape_whitespaces (all default true)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2


@dataclass
class Piece:
    piece: str
    score: float = 0.0
    type: int = NORMAL


@dataclass
class SpmModel:
    pieces: list[Piece] = field(default_factory=list)
    model_type: int = UNIGRAM
    byte_fallback: bool = False
    treat_whitespace_as_suffix: bool = False
    unk_surface: str = " \u2047 "
    normalizer_name: str = ""
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def fields(data: bytes):
    """(field number, wire type, value) for each field of one message."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} (field {number})")
        yield number, wire, value


def _piece(data: bytes) -> Piece:
    piece = Piece("")
    for number, _, value in fields(data):
        if number == 1:
            piece.piece = value.decode("utf-8")
        elif number == 2:
            piece.score = struct.unpack("<f", value)[0]
        elif number == 3:
            piece.type = value
    return piece


def read_spm_model(path: str) -> SpmModel:
    """The pieces, model type and normalizer settings of a SentencePiece ``.model`` file."""
    with open(path, "rb") as f:
        data = f.read()
    model = SpmModel()
    for number, _, value in fields(data):
        if number == 1:
            model.pieces.append(_piece(value))
        elif number == 2:
            for sub, _, v in fields(value):
                if sub == 3:
                    model.model_type = v
                elif sub == 24:
                    model.treat_whitespace_as_suffix = bool(v)
                elif sub == 35:
                    model.byte_fallback = bool(v)
                elif sub == 44:
                    model.unk_surface = v.decode("utf-8")
        elif number == 3:
            for sub, _, v in fields(value):
                if sub == 1:
                    model.normalizer_name = v.decode("utf-8")
                elif sub == 2:
                    model.precompiled_charsmap = bytes(v)
                elif sub == 3:
                    model.add_dummy_prefix = bool(v)
                elif sub == 4:
                    model.remove_extra_whitespaces = bool(v)
                elif sub == 5:
                    model.escape_whitespaces = bool(v)
    return model
