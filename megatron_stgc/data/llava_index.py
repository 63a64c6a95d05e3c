"""On-disk index for LLaVA-format instruction data, validation counts, DP sampler.

Input: a LLaVA conversation file, either a JSON top-level list or JSONL (one
record per line). A record is ``{"id": ..., "image": optional relative path,
"conversations": [{"from": "human"|"gpt", "value": str}, ...]}``.

``LlavaIndex(path)`` finds the byte span of every record once (JSONL: lines;
JSON list: a streaming scan for the top-level objects that skips over string
literals, so escaped quotes and braces inside strings are handled), validates
each record, and saves the spans of the good ones as one ``int64 [N, 2]``
``.npy`` array (byte offset, byte length) plus a small JSON metadata file. Every
process opens that array memory-mapped and reads a record with one ``pread``
of its span: no rank ever loads the whole data set. The index
is rebuilt when the data file's size or mtime, the image root or the index
format changes.

Bad records are skipped and counted by kind in a ``BadSampleCounter`` (kept in
the metadata, so every process can ``report()`` them), never silently and
never by crashing.

``ShardedSampler`` turns a sample count into this data-parallel rank's stream
of record indices with the same convention as ``megatron_stgc/data/dataset.py``:
the run's ``i``-th sample is ``permutation_epoch[i % N]`` with
``epoch = i // N`` and a fresh ``np.random.default_rng([seed, epoch])``
permutation per epoch; global batch ``g`` holds run positions
``[g*GBS, (g+1)*GBS)`` and rank ``r`` of ``D`` takes the contiguous slice
``[g*GBS + r*GBS/D, g*GBS + (r+1)*GBS/D)``. The position in the data is fully
described by ``consumed_samples``.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from megatron_stgc.data.record_checks import (
    IMAGE_OUTSIDE_ROOT,
    INVALID_UNICODE,
    MAX_RECORD_BYTES,
    NUL_CHARACTER,
    RECORD_TOO_LARGE,
    TEXT_TOO_LONG,
    ImagePathRefused,
    resolve_image_path,
    safe_label,
    text_problem,
)

INDEX_FORMAT_VERSION = 4  # bump when the index layout or validation rules change

# Kinds of bad records (BadSampleCounter keys).
MALFORMED_JSON = "malformed_json"  # not parseable, or not a JSON object
NON_UTF8 = "non_utf8"  # bytes that are not valid UTF-8
EMPTY_CONVERSATIONS = "empty_conversations"  # conversations missing or []
BAD_TURN = "bad_turn"  # a turn that is not {"from": str, "value": str}
NO_ASSISTANT_TURN = "no_assistant_turn"  # no turn from "gpt" (or "assistant")
MISSING_IMAGE = "missing_image"  # image given but not a file under the image root
BAD_IMAGE_FIELD = "bad_image_field"  # "image" present but not a string path
# and the text/path kinds of record_checks: invalid_unicode, nul_character, text_too_long,
# record_too_large, image_outside_root
BAD_KINDS = (MALFORMED_JSON, NON_UTF8, EMPTY_CONVERSATIONS, BAD_TURN, NO_ASSISTANT_TURN,
             MISSING_IMAGE, BAD_IMAGE_FIELD, INVALID_UNICODE, NUL_CHARACTER, TEXT_TOO_LONG,
             RECORD_TOO_LARGE, IMAGE_OUTSIDE_ROOT)
ASSISTANT_ROLES = ("gpt", "assistant")

# One JSON string literal (escapes included), or one bracket. Matching a whole string
# at once lets the JSON-list scan skip braces/quotes inside strings.
_JSON_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)
_STRAY = re.compile(rb"[^,\s]+")  # text between a JSON list's elements that is not ',' or blank
_BOM = b"\xef\xbb\xbf"
_LINE_CHUNK_BYTES = 64 << 20


@dataclass
class BadSampleCounter:
    """Bad records by kind: ``counts[kind]`` and up to ``max_examples`` ids per kind."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    def add(self, kind: str, record_id: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        examples = self.examples.setdefault(kind, [])
        if len(examples) < self.max_examples:
            examples.append(record_id)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def report(self) -> str:
        """One line per kind: ``kind: count (e.g. id1, id2)``; or a line saying none."""
        if not self.counts:
            return "bad samples: none"
        lines = [f"bad samples: {self.total} skipped"]
        for kind in sorted(self.counts):
            lines.append(f"  {kind}: {self.counts[kind]} (e.g. {', '.join(self.examples[kind])})")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"counts": self.counts, "examples": self.examples}

    @classmethod
    def merged(cls, counters: list["BadSampleCounter"]) -> "BadSampleCounter":
        """One counter summing ``counters`` (e.g. one per rank); examples deduplicated."""
        total = cls()
        for counter in counters:
            for kind, count in counter.counts.items():
                total.counts[kind] = total.counts.get(kind, 0) + count
                total.examples.setdefault(kind, []).extend(counter.examples[kind])
        for kind in total.examples:
            total.examples[kind] = sorted(set(total.examples[kind]))[:total.max_examples]
        return total

    @classmethod
    def from_json(cls, data: dict) -> "BadSampleCounter":
        return cls(counts=dict(data["counts"]), examples={k: list(v) for k, v in
                                                          data["examples"].items()})


# ---------------------------------------------------------------------------- spans


def jsonl_spans(data: bytes | mmap.mmap) -> np.ndarray:
    """(offset, length) in bytes of every non-blank line, int64 [n, 2] (a UTF-8 BOM
    at the start of the file is not part of the first line)."""
    newline_positions = [np.flatnonzero(np.frombuffer(data, np.uint8, count=min(
        _LINE_CHUNK_BYTES, len(data) - start), offset=start) == ord("\n")) + start
                         for start in range(0, len(data), _LINE_CHUNK_BYTES)]
    ends = np.concatenate(newline_positions + [np.array([len(data)], np.int64)]).astype(np.int64)
    starts = np.concatenate([[len(_BOM) if data[:len(_BOM)] == _BOM else 0],
                             ends[:-1] + 1]).astype(np.int64)
    if len(ends) > 1 and ends[-1] == starts[-1]:  # file ends with "\n": no last line
        starts, ends = starts[:-1], ends[:-1]
    spans = np.stack([starts, np.maximum(ends - starts, 0)], axis=1)
    return spans[[bool(data[s:s + n].strip()) for s, n in spans]] if len(spans) else spans


def json_list_spans(data: bytes | mmap.mmap) -> np.ndarray:
    """(offset, length) in bytes of every top-level element of a JSON list, int64 [n, 2].

    Objects and arrays are found by bracket depth over string-skipping tokens;
    anything else between the list's commas (strings, numbers, stray text) and
    any text after the closing ']' becomes a span too, so validation counts it
    as malformed instead of dropping it. Raises ValueError when the file's
    structure is broken (not a list, unbalanced brackets, an unterminated
    string): unlike JSONL, one broken record can hide where the others are.
    """
    spans: list[tuple[int, int]] = []
    depth = 0
    element_start = previous_end = -1
    for match in _JSON_TOKEN.finditer(data):
        token = match.group()
        if depth == 0 and token != b"[":
            raise ValueError(f"a JSON list must start with '[' (byte {match.start()})")
        if depth == 1 and token != b"]":
            spans.extend(_stray_spans(data, previous_end, match.start()))
        if token[0] == ord('"'):
            if depth == 1:
                spans.append((match.start(), match.end() - match.start()))
                previous_end = match.end()
        elif token in (b"[", b"{"):
            if depth == 0:
                previous_end = match.end()
            if depth == 1:
                element_start = match.start()
            depth += 1
        else:
            depth -= 1
            if depth == 1:
                spans.append((element_start, match.end() - element_start))
                previous_end = match.end()
            elif depth == 0:
                spans.extend(_stray_spans(data, previous_end, match.start()))
                previous_end = match.end()
            elif depth < 0:
                raise ValueError(f"unbalanced '{token.decode()}' at byte {match.start()}")
    if depth != 0:
        raise ValueError(f"unterminated JSON list (bracket depth {depth} at the end)")
    spans.extend(_stray_spans(data, previous_end, len(data)))
    return np.asarray(spans, dtype=np.int64).reshape(-1, 2)


def _stray_spans(data: bytes | mmap.mmap, start: int, end: int) -> list[tuple[int, int]]:
    """Spans of the non-blank, non-comma text in ``data[start:end]`` (usually none)."""
    if start < 0 or end - start <= 0:
        return []
    gap = bytes(data[start:end])
    if not gap.strip(b" \t\r\n,"):
        return []
    return [(start + m.start(), m.end() - m.start()) for m in _STRAY.finditer(gap)]


def is_jsonl(data: bytes | mmap.mmap) -> bool:
    """True unless the first non-blank byte (after a UTF-8 BOM) is '[' (a JSON list)."""
    head = bytes(data[:4096])
    head = head[len(_BOM):] if head.startswith(_BOM) else head
    return not head.lstrip().startswith(b"[")


# ---------------------------------------------------------------------------- validation


def record_label(record: object, number: int) -> str:
    """The record's id for reports (escaped, shortened), or ``#number`` (0-based position)."""
    if isinstance(record, dict) and "id" in record:
        return safe_label(record["id"])
    return f"#{number}"


def is_turn(turn: object) -> bool:
    """True for ``{"from": str, "value": str, ...}``."""
    return (isinstance(turn, dict) and isinstance(turn.get("from"), str)
            and isinstance(turn.get("value"), str))


def classify_record(raw: bytes, number: int, image_root: Optional[str],
                    allow_image_outside_root: bool = False) -> tuple[Optional[str], str]:
    """(bad kind or None, label) of one record's bytes."""
    kind, label, _ = _classify(raw, number, image_root, allow_image_outside_root)
    return kind, label


def modality_length(record: dict) -> int:
    """MoE-LLaVA's length of a good record for --group-by-modality-length: the number of
    whitespace-separated words over all turns, positive with an image, negative without
    (MoE-LLaVA moellava/train/train.py:956-965, ``modality_lengths``); never 0 (MoE-LLaVA
    asserts that, llava_trainer.py:62): an empty conversation counts one word."""
    words = max(1, sum(len(turn["value"].split()) for turn in record["conversations"]))
    return words if record.get("image") is not None else -words


def _classify(raw: bytes, number: int, image_root: Optional[str],
              allow_image_outside_root: bool) -> tuple[Optional[str], str, Optional[dict]]:
    """(bad kind or None, label, the parsed record when it is good)."""
    if len(raw) > MAX_RECORD_BYTES:
        return RECORD_TOO_LARGE, f"#{number}", None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return NON_UTF8, f"#{number}", None
    try:
        record = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return MALFORMED_JSON, f"#{number}", None
    label = record_label(record, number)
    kind = _record_problem(record, image_root, allow_image_outside_root)
    return kind, label, (record if kind is None else None)


def _record_problem(record: object, image_root: Optional[str],
                    allow_image_outside_root: bool) -> Optional[str]:
    """The bad kind of a parsed record, or None."""
    if not isinstance(record, dict):
        return MALFORMED_JSON
    problem = text_problem(record)
    if problem is not None:
        return problem
    turns = record.get("conversations")
    if not turns:
        return EMPTY_CONVERSATIONS
    if not isinstance(turns, list) or not all(is_turn(t) for t in turns):
        return BAD_TURN
    if not any(t["from"] in ASSISTANT_ROLES for t in turns):
        return NO_ASSISTANT_TURN
    image = record.get("image")
    if image is None:
        return None
    if not isinstance(image, str) or not image:
        return BAD_IMAGE_FIELD
    try:
        path = resolve_image_path(image, image_root, allow_image_outside_root)
    except ImagePathRefused:
        return IMAGE_OUTSIDE_ROOT
    if image_root is not None and not os.path.isfile(path):
        return MISSING_IMAGE
    return None


def validate_spans(data: bytes | mmap.mmap, spans: np.ndarray, image_root: Optional[str],
                   allow_image_outside_root: bool = False
                   ) -> tuple[np.ndarray, BadSampleCounter, np.ndarray]:
    """(spans of the good records int64 [n_good, 2], counter of the bad ones,
    modality lengths of the good records int32 [n_good])."""
    counter = BadSampleCounter()
    keep = np.ones(len(spans), dtype=bool)
    lengths = []
    for number, (offset, length) in enumerate(spans.tolist()):
        kind, label, record = _classify(data[offset:offset + length], number, image_root,
                                        allow_image_outside_root)
        if kind is not None:
            keep[number] = False
            counter.add(kind, label)
        else:
            lengths.append(modality_length(record))
    return spans[keep], counter, np.asarray(lengths, dtype=np.int32)


# ---------------------------------------------------------------------------- index


def file_signature(path: str, image_root: Optional[str],
                   allow_image_outside_root: bool = False) -> dict:
    """What the index depends on: data size/mtime, image root (and whether images may
    leave it; without a root, the working directory), format version."""
    stat = os.stat(path)
    root = os.getcwd() if image_root is None else image_root
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "image_root": os.path.abspath(root), "root_given": image_root is not None,
            "allow_image_outside_root": bool(allow_image_outside_root),
            "version": INDEX_FORMAT_VERSION}


def index_paths(path: str, cache_dir: Optional[str]) -> tuple[str, str]:
    """(spans .npy, metadata .json) next to the data file, or in ``cache_dir``."""
    if cache_dir is None:
        stem = path
    else:
        key = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
        stem = os.path.join(cache_dir, f"{os.path.basename(path)}.{key}")
    return stem + ".llava_idx.npy", stem + ".llava_idx.json"


def lengths_path(spans_path: str) -> str:
    """Where the index keeps the good records' modality lengths (int32 [n_good] .npy)."""
    return spans_path.replace(".llava_idx.npy", ".llava_len.npy")


def _write_atomic(target: str, write) -> None:
    tmp = f"{target}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, target)


def build_index(path: str, image_root: Optional[str], spans_path: str, meta_path: str,
                allow_image_outside_root: bool = False) -> None:
    """Scan, validate and save the index (spans and lengths first, metadata last, atomic)."""
    signature = file_signature(path, image_root, allow_image_outside_root)
    with open(path, "rb") as f, _map_file(f) as data:
        jsonl = is_jsonl(data)
        spans = jsonl_spans(data) if jsonl else json_list_spans(data)
        good_spans, counter, lengths = validate_spans(data, spans, image_root,
                                                      allow_image_outside_root)

    def write_spans(tmp):
        with open(tmp, "wb") as out:
            np.save(out, good_spans)

    def write_lengths(tmp):
        with open(tmp, "wb") as out:
            np.save(out, lengths)

    def write_meta(tmp):
        with open(tmp, "w") as out:
            json.dump({"signature": signature, "format": "jsonl" if jsonl else "json",
                       "num_records": int(len(spans)), "num_good": int(len(good_spans)),
                       "num_with_image": int((lengths > 0).sum()),
                       "bad_samples": counter.to_json()}, out)

    os.makedirs(os.path.dirname(os.path.abspath(spans_path)), exist_ok=True)
    _write_atomic(spans_path, write_spans)
    _write_atomic(lengths_path(spans_path), write_lengths)
    _write_atomic(meta_path, write_meta)


def _map_file(f):
    """Read-only mmap of an open file (an empty bytes object for an empty file)."""
    if os.fstat(f.fileno()).st_size == 0:
        return _EmptyMap()
    return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


class _EmptyMap(bytes):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def close(self):
        pass


class LlavaIndex:
    """Random access to the good records of a LLaVA JSON/JSONL file.

    ``spans``: memory-mapped int64 [num_good, 2] (byte offset, byte length).
    ``modality_lengths``: memory-mapped int32 [num_good], see ``modality_length``.
    ``bad_samples``: the records skipped at build time, by kind.
    Building is idempotent and atomic; on many ranks let rank 0 open it first
    (the others would otherwise each build the same index). Pickling sends the
    paths; the copy reopens the saved index (data loader workers).
    """

    def __init__(self, path: str, image_root: Optional[str] = None,
                 cache_dir: Optional[str] = None, allow_image_outside_root: bool = False):
        self.path = path
        self.image_root = image_root
        self.allow_image_outside_root = allow_image_outside_root
        self.spans_path, self.meta_path = index_paths(path, cache_dir)
        self.rebuilt = False
        meta = self._load_meta()
        signature = file_signature(path, image_root, allow_image_outside_root)
        if meta is None or meta["signature"] != signature:
            build_index(path, image_root, self.spans_path, self.meta_path,
                        allow_image_outside_root)
            self.rebuilt = True
            meta = self._load_meta()
        self._open(meta)

    def _open(self, meta: dict) -> None:
        self.format: str = meta["format"]
        self.num_records: int = meta["num_records"]  # good + bad
        self.num_with_image: int = meta["num_with_image"]  # good records with an image
        self.bad_samples = BadSampleCounter.from_json(meta["bad_samples"])
        self.spans: np.ndarray = np.load(self.spans_path, mmap_mode="r")
        self.modality_lengths: np.ndarray = np.load(lengths_path(self.spans_path),
                                                    mmap_mode="r")
        self._fd = os.open(self.path, os.O_RDONLY)

    def __getstate__(self) -> dict:
        return {"path": self.path, "image_root": self.image_root,
                "allow_image_outside_root": self.allow_image_outside_root,
                "spans_path": self.spans_path, "meta_path": self.meta_path}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.rebuilt = False
        self._open(self._load_meta())

    def _load_meta(self) -> Optional[dict]:
        try:
            with open(self.meta_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def __len__(self) -> int:
        return len(self.spans)

    def raw(self, i: int) -> bytes:
        """The bytes of good record ``i`` (0 <= i < len), read with one pread.

        (pread rather than an mmap of the data file: a page fault maps the
        kernel's read-ahead window into this process's RSS, up to the whole file
        under random access; pread leaves those pages in the shared page cache.)
        """
        offset, length = (int(v) for v in self.spans[i])
        return os.pread(self._fd, length, offset)

    def record(self, i: int) -> dict:
        """Good record ``i``, parsed."""
        return json.loads(self.raw(i).decode("utf-8"))

    def report(self) -> str:
        return (f"{self.path}: {len(self)} of {self.num_records} records usable\n"
                + self.bad_samples.report())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.spans = None
        self.modality_lengths = None

    def __enter__(self) -> "LlavaIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------- sampler


@dataclass
class ShardedSampler:
    """This DP rank's record indices, deterministic and resumable.

    ``num_samples``: records per epoch (``len(LlavaIndex)``). ``global_batch_size``
    (default ``dp_size``) must be a multiple of ``dp_size``. ``consumed_samples``:
    run positions already consumed by all ranks together (what a checkpoint stores);
    this rank resumes at its first position >= it, so the resumed stream is exactly
    the uninterrupted stream's suffix. Iteration is endless (epochs follow each other).
    """

    num_samples: int
    seed: int
    dp_rank: int
    dp_size: int
    consumed_samples: int = 0
    global_batch_size: Optional[int] = None

    def __post_init__(self):
        if self.global_batch_size is None:
            self.global_batch_size = self.dp_size
        if self.num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {self.num_samples}")
        if not 0 <= self.dp_rank < self.dp_size:
            raise ValueError(f"dp_rank {self.dp_rank} not in [0, {self.dp_size})")
        if self.global_batch_size % self.dp_size:
            raise ValueError(f"global_batch_size {self.global_batch_size} is not a multiple "
                             f"of dp_size {self.dp_size}")
        self._epoch = -1
        self._permutation: Optional[np.ndarray] = None

    @property
    def per_rank(self) -> int:
        return self.global_batch_size // self.dp_size

    def permutation(self, epoch: int) -> np.ndarray:
        """Record order of ``epoch``, int64 [num_samples] (cached for the current epoch)."""
        if epoch != self._epoch:
            self._permutation = np.random.default_rng([self.seed, epoch]).permutation(
                self.num_samples)
            self._epoch = epoch
        return self._permutation

    def record_index(self, position: int) -> int:
        """Record of run position ``position`` (counting all ranks, all epochs)."""
        epoch, offset = divmod(position, self.num_samples)
        return int(self.permutation(epoch)[offset])

    def positions(self) -> Iterator[int]:
        """This rank's run positions, ascending, from ``consumed_samples`` on."""
        batch = self.consumed_samples // self.global_batch_size
        while True:
            start = batch * self.global_batch_size + self.dp_rank * self.per_rank
            yield from range(max(start, self.consumed_samples), start + self.per_rank)
            batch += 1

    def __iter__(self) -> Iterator[int]:
        for position in self.positions():
            yield self.record_index(position)
