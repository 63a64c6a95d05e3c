"""Answer files, VQA-style answer normalisation, exact-match scoring, comparison tables.

Pure Python (no torch), so it can score answer files anywhere.

File layouts (JSON Lines, one object per line):

* questions (LLaVA ``model_vqa`` layout): ``{"question_id", "image" (optional),
  "text", "category"}`` - ``text`` without the ``<image>`` tag.
* answers (LLaVA eval answer layout, written by ``write_answers``):
  ``{"question_id", "prompt", "text" (the model's answer), "answer_id",
  "model_id", "metadata": {...}}``.
* ground truth: ``{"question_id", "answer" (a string, or a list of accepted
  strings), "category"}``.

Question ids are compared as strings (``5`` and ``"5"`` are the same question).

``normalize_answer`` follows the rules of the official VQA evaluation,
re-implemented here, with the deviations marked:

1. newlines/tabs become spaces; lowercase; surrounding whitespace stripped;
2. a comma between two digits is removed (``"1,000"`` -> ``"1000"``);
3. the VQA punctuation characters ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``
   become spaces (so ``"yes/no"`` -> ``"yes no"`` and ``"(7)"`` -> ``"7"``).
   Deviations: VQA deletes them instead when any of them touches a space
   anywhere in the answer (then ``"yes/no"`` -> ``"yesno"``); and a ``-``
   that starts a number (``"-3"``, at the start or after a space, followed by a
   digit) is kept as a minus sign;
4. a period is removed unless a digit follows it (decimals such as ``"3.5"``
   survive, ``"Seven."`` -> ``"seven"``);
5. per word: number words become digits (``"none"``/``"zero"`` -> ``"0"`` ...
   ``"ten"`` -> ``"10"`` as in VQA; deviation: also ``"eleven"``,
   ``"twelve"``, the range of the embedded text generator); the articles
   ``a``/``an``/``the`` are dropped; a short list of apostrophe-less
   contractions is repaired (``"dont"`` -> ``"don't"``, ``"isnt"`` -> ``"isn't"`` ...);
   apostrophes are otherwise left alone;
6. words are joined with single spaces.

Nothing else is stripped: ``"The answer is yes"`` normalises to
``"answer is yes"`` and does NOT match ``"yes"`` (exact match is strict; the
models are trained to give the bare answer).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any, Optional, Union

PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
                "eleven": "11", "twelve": "12"}
ARTICLES = frozenset({"a", "an", "the"})
CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "didnt": "didn't", "isnt": "isn't",
                "arent": "aren't", "wasnt": "wasn't", "werent": "weren't", "cant": "can't",
                "couldnt": "couldn't", "wont": "won't", "wouldnt": "wouldn't",
                "shouldnt": "shouldn't", "hasnt": "hasn't", "havent": "haven't",
                "im": "i'm", "ive": "i've", "youre": "you're", "theyre": "they're",
                "thats": "that's", "whats": "what's", "theres": "there's"}
UNCATEGORIZED = "uncategorized"
MAX_LISTED_IDS = 20

_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")
_MINUS_SIGN = re.compile(r"(?:(?<=\s)|^)-(?=\d)")
_PUNCTUATION = re.compile("[" + re.escape(PUNCTUATION) + "]")
_PERIOD = re.compile(r"\.(?!\d)")
_SIGN_PLACEHOLDER = "\x00"

Records = Union[str, os.PathLike, Iterable[Mapping]]


def normalize_answer(text: Any) -> str:
    """VQA-style normalised answer (rules in the module docstring); None -> ""."""
    if text is None:
        return ""
    text = str(text).replace("\n", " ").replace("\t", " ").strip().lower()
    text = _DIGIT_COMMA.sub("", text)
    text = _MINUS_SIGN.sub(_SIGN_PLACEHOLDER, text)
    text = _PUNCTUATION.sub(" ", text).replace(_SIGN_PLACEHOLDER, "-")
    text = _PERIOD.sub("", text)
    words = []
    for word in text.split():
        word = NUMBER_WORDS.get(word, word)
        if word in ARTICLES:
            continue
        words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


# ---------------------------------------------------------------------------- files


def read_jsonl(path: Union[str, os.PathLike]) -> list[dict]:
    """The objects of a JSON Lines file (blank lines skipped).

    Raises ValueError naming the file and line for a line that is not a JSON object.
    """
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got "
                                 f"{type(record).__name__}")
            records.append(record)
    return records


ANSWER_KEYS = ("question_id", "prompt", "text", "answer_id", "model_id", "metadata")


def write_answers(path: Union[str, os.PathLike], records: Iterable[Mapping]) -> int:
    """Write answers in LLaVA's eval layout, one JSON object per line; returns the count.

    Each record needs "question_id" and "text"; "prompt" defaults to "",
    "answer_id" to the line number, "model_id" to "", "metadata" to {}; any
    other keys are kept after these. The file is written to a temporary name
    and renamed, so readers never see half a file.
    """
    path = os.fspath(path)
    lines = []
    for number, record in enumerate(records):
        for key in ("question_id", "text"):
            if key not in record:
                raise ValueError(f"answer record {number} has no {key!r}: {dict(record)}")
        line = {"question_id": record["question_id"], "prompt": record.get("prompt", ""),
                "text": record["text"], "answer_id": record.get("answer_id", str(number)),
                "model_id": record.get("model_id", ""),
                "metadata": dict(record.get("metadata") or {})}
        line.update({k: v for k, v in record.items() if k not in ANSWER_KEYS})
        lines.append(json.dumps(line, ensure_ascii=False))
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    # a lone surrogate from a question's text is written as its JSON escape (\udcff), which
    # reads back as the same string, instead of failing the whole file
    with open(tmp, "w", encoding="utf-8", errors="backslashreplace") as f:
        f.write("".join(line + "\n" for line in lines))
    os.replace(tmp, path)
    return len(lines)


def _as_records(source: Records, what: str) -> list[Mapping]:
    if isinstance(source, (str, os.PathLike)):
        return read_jsonl(source)
    records = list(source)
    for number, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise ValueError(f"{what} record {number} is not a mapping: {record!r}")
    return records


def _by_id(records: list[Mapping], what: str) -> dict[str, Mapping]:
    by_id: dict[str, Mapping] = {}
    duplicates = []
    for number, record in enumerate(records):
        if "question_id" not in record:
            raise ValueError(f"{what} record {number} has no 'question_id': {dict(record)}")
        key = str(record["question_id"])
        if key in by_id:
            duplicates.append(key)
        by_id[key] = record
    if duplicates:
        raise ValueError(f"{what}: {len(duplicates)} duplicate question ids, e.g. "
                         f"{duplicates[:MAX_LISTED_IDS]}")
    return by_id


# ---------------------------------------------------------------------------- scoring


def _empty_row() -> dict:
    return {"correct": 0, "total": 0, "answered": 0, "missing": 0, "errors": 0, "accuracy": 0.0}


def _references(truth: Mapping, key: str) -> set[str]:
    if "answer" not in truth:
        raise ValueError(f"ground truth {key!r} has no 'answer'")
    answer = truth["answer"]
    answers = answer if isinstance(answer, (list, tuple)) else [answer]
    return {normalize_answer(a) for a in answers}


def score(answers: Records, ground_truth: Records) -> dict:
    """Exact match after ``normalize_answer``, per category and overall.

    answers: path of an answers JSONL, or its records ({"question_id", "text", ...}).
    ground_truth: path or records ({"question_id", "answer", "category"}); "answer"
      may be a list of accepted answers; no "category" -> "uncategorized".

    Every ground-truth question counts: a question without an answer is wrong
    and counted in "missing" (its ids listed, up to 20, in "missing_ids"). An
    answer whose metadata has an "error", or whose "text" is not a string, is
    wrong and counted in "errors". Raises ValueError for an answer to a
    question id that is not in the ground truth, for duplicate ids on either
    side, and for an empty ground truth.

    Returns {"overall": row, "per_category": {category: row}, "missing_ids": [...],
    "num_questions", "num_answers"}, row = {"correct", "total", "answered",
    "missing", "errors", "accuracy" (correct / total)}.
    """
    truth_by_id = _by_id(_as_records(ground_truth, "ground truth"), "ground truth")
    answers_by_id = _by_id(_as_records(answers, "answers"), "answers")
    if not truth_by_id:
        raise ValueError("ground truth has no questions")
    unknown = [key for key in answers_by_id if key not in truth_by_id]
    if unknown:
        raise ValueError(f"{len(unknown)} answers to question ids not in the ground truth, "
                         f"e.g. {unknown[:MAX_LISTED_IDS]}")
    overall = _empty_row()
    per_category: dict[str, dict] = {}
    missing_ids = []
    for key, truth in truth_by_id.items():
        category = str(truth.get("category") or UNCATEGORIZED)
        references = _references(truth, key)
        rows = (overall, per_category.setdefault(category, _empty_row()))
        answer = answers_by_id.get(key)
        if answer is None:
            correct, counters = False, ("missing",)
            if len(missing_ids) < MAX_LISTED_IDS:
                missing_ids.append(key)
        else:
            text = answer.get("text")
            metadata = answer.get("metadata")
            failed = not isinstance(text, str) or (isinstance(metadata, Mapping)
                                                   and metadata.get("error"))
            correct = not failed and normalize_answer(text) in references
            counters = ("answered", "errors") if failed else ("answered",)
        for row in rows:
            row["total"] += 1
            row["correct"] += int(correct)
            for counter in counters:
                row[counter] += 1
    for row in (overall, *per_category.values()):
        row["accuracy"] = row["correct"] / row["total"]
    return {"overall": overall, "per_category": dict(sorted(per_category.items())),
            "missing_ids": missing_ids, "num_questions": len(truth_by_id),
            "num_answers": len(answers_by_id)}


# ---------------------------------------------------------------------------- tables

Row = tuple[str, Mapping[str, Any]]


def accuracy_rows(results: Mapping[str, Mapping], percent: bool = True) -> list[Row]:
    """Rows for ``format_table`` from {run: score() result}: one per category, overall,
    and the missing answers; accuracies as "93.5%" (or fractions with percent=False)."""
    categories = sorted({c for result in results.values() for c in result["per_category"]})

    def value(row: Optional[Mapping]):
        if row is None:
            return None
        return f"{100 * row['accuracy']:.1f}%" if percent else row["accuracy"]

    rows: list[Row] = [(f"accuracy {c}", {run: value(r["per_category"].get(c))
                                          for run, r in results.items()}) for c in categories]
    rows.append(("accuracy overall", {run: value(r["overall"]) for run, r in results.items()}))
    rows.append(("missing answers", {run: r["overall"]["missing"] for run, r in results.items()}))
    return rows


def format_value(value: Any, float_format: str = "{:.4f}", missing: str = "n/a") -> str:
    """One table cell: floats with ``float_format``, lists space-joined, None -> missing."""
    if value is None:
        return missing
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return float_format.format(value)
    if isinstance(value, (list, tuple)):
        return " ".join(format_value(v, float_format, missing) for v in value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={format_value(v, float_format, missing)}"
                         for k, v in value.items())
    return str(value)


def format_table(rows: Union[Iterable[Row], Mapping[str, Mapping[str, Any]]],
                 columns: Optional[Iterable[str]] = None, *, label_header: str = "",
                 float_format: str = "{:.4f}", missing: str = "n/a",
                 title: Optional[str] = None) -> str:
    """A plain-text side-by-side table, one column per run.

    rows: either (label, {run: value}) pairs, in display order, or a mapping
      {run: {label: value}} (rows in order of first appearance).
    columns: the runs, in order (default: in order of first appearance).
    A run without a value for a row shows ``missing``. Labels are left-aligned,
    values right-aligned; floats use ``float_format``; lists are space-joined.
    """
    if isinstance(rows, Mapping):
        by_run = rows
        labels = list(dict.fromkeys(label for row in by_run.values() for label in row))
        row_list: list[Row] = [(label, {run: by_run[run][label] for run in by_run
                                        if label in by_run[run]}) for label in labels]
    else:
        row_list = [(str(label), dict(values)) for label, values in rows]
    if columns is None:
        columns = list(dict.fromkeys(run for _, values in row_list for run in values))
    columns = [str(c) for c in columns]
    cells = [[label] + [format_value(values.get(run), float_format, missing) for run in columns]
             for label, values in row_list]
    header = [label_header] + columns
    widths = [max(len(line[i]) for line in [header] + cells) for i in range(len(header))]

    def render(line: list[str]) -> str:
        return "  ".join([line[0].ljust(widths[0])]
                         + [cell.rjust(width) for cell, width in zip(line[1:], widths[1:])]
                         ).rstrip()

    lines = [] if title is None else [title]
    lines += [render(header), render(["-" * w for w in widths])]
    lines += [render(line) for line in cells]
    return "\n".join(lines) + "\n"
