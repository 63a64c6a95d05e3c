"""What every benchmark shares: its files, its questions, answers aligned to them, the report.

A benchmark (one module per benchmark in this package) reads its question file in the layout
LLaVA / MoE-LLaVA's eval scripts use and turns every record into an eval question::

    {"key": str,            unique: how an answer line is matched back to its question
     "question_id": ...,    as in the file (written back unchanged into the answer line)
     "text": str,           what the model is asked (prompt suffix included; no <image> tag)
     "prompt": str,         the answer line's "prompt" (what MoE-LLaVA's script records)
     "image": str | None,   path under the benchmark's image folder
     "category": str | None,
     "extra": {...}}        more keys for the answer line (MMBench: round_id, options, ...)

Answers are LLaVA's answer lines (``question_id, prompt, text, answer_id, model_id,
metadata``); ``align_answers`` matches them to the questions by key and refuses a line that
is no question of the benchmark (an answer file from another benchmark) with the file and
the line. A question without an answer is *missing*; an answer whose metadata carries an
error (the image could not be read, the prompt did not fit) is an *error*; both score as
wrong and are counted in every report (``counts``), missing images separately.

Pure Python: no torch, so answer files can be scored anywhere.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_stgc.eval.scoring import MAX_LISTED_IDS

MISSING_IMAGE_KIND = "missing_image"  # data/images.MISSING_IMAGE (kept torch-free here)
SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."


class BenchmarkError(ValueError):
    """A benchmark file (questions, annotations, answers) that cannot be used; the message
    names the file and the record."""


@dataclass
class BenchmarkFiles:
    """Where one benchmark's files are (absolute or relative to the working directory)."""

    question_file: str
    image_folder: Optional[str] = None
    annotations: Optional[str] = None  # ground truth (file or folder); None: not scored
    answers_file: Optional[str] = None
    submission_file: Optional[str] = None
    prompt_suffix: Optional[str] = None  # None: the benchmark's own
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Defaults:
    """A benchmark's layout under its folder in MoE-LLaVA's ``eval/`` tree (docs/EVAL.md)."""

    question_file: str
    image_folder: Optional[str]
    annotations: Optional[str]  # None: no ground truth is published (test-dev)
    prompt_suffix: str
    max_new_tokens: int
    submission: Optional[str] = None  # file name under answers_upload/ ("{model_id}" filled)


def with_suffix(text: str, suffix: str) -> str:
    """``text`` + "\\n" + ``suffix`` unless it already ends with it (LLaVA's question files
    carry their suffix; a file without it gets it, so both ask the same question)."""
    if not suffix or text.rstrip().endswith(suffix):
        return text
    return f"{text}\n{suffix}"


def without_suffix(text: str, suffix: str) -> str:
    """``text`` with a trailing ``suffix`` (and the newline before it) removed."""
    stripped = text.rstrip()
    if suffix and stripped.endswith(suffix):
        return stripped[:-len(suffix)].rstrip()
    return text


# ---------------------------------------------------------------------------- reading


def read_json(path: str, what: str) -> Any:
    """A whole JSON file; BenchmarkError naming ``what`` and the file when it is not JSON."""
    if not os.path.isfile(path):
        raise BenchmarkError(f"{what} {path} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except ValueError as error:
            raise BenchmarkError(f"{what} {path}: not a JSON file ({error})") from None


def read_jsonl_records(path: str, what: str) -> list[tuple[int, dict]]:
    """[(line number, object)] of a JSON Lines file; BenchmarkError names file and line."""
    if not os.path.isfile(path):
        raise BenchmarkError(f"{what} {path} does not exist")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise BenchmarkError(f"{what} {path}:{number}: not JSON ({error}); expected one "
                                     "JSON object per line") from None
            if not isinstance(record, dict):
                raise BenchmarkError(f"{what} {path}:{number}: expected a JSON object, got "
                                     f"{type(record).__name__}")
            records.append((number, record))
    if not records:
        raise BenchmarkError(f"{what} {path}: no records")
    return records


def require_keys(record: Mapping, keys: tuple[str, ...], where: str) -> None:
    """BenchmarkError naming ``where`` (file:line) when ``record`` lacks one of ``keys``."""
    absent = [key for key in keys if key not in record]
    if absent:
        raise BenchmarkError(f"{where}: no {', '.join(repr(k) for k in absent)} (keys: "
                             f"{sorted(record)[:12]}); not this benchmark's layout")


def question(key: str, question_id: Any, text: str, *, prompt: Optional[str] = None,
             image: Optional[str] = None, category: Optional[str] = None,
             **extra: Any) -> dict:
    """One eval question (the layout in the module docstring)."""
    return {"key": key, "question_id": question_id, "text": text,
            "prompt": text if prompt is None else prompt, "image": image,
            "category": category, "extra": extra}


def unique_keys(questions: list[dict], path: str) -> None:
    seen: set[str] = set()
    for number, item in enumerate(questions):
        if item["key"] in seen:
            raise BenchmarkError(f"{path}: question {item['question_id']!r} (record {number + 1}) "
                                 "appears twice")
        seen.add(item["key"])


def count_missing_images(questions: list[dict], image_folder: Optional[str]) -> list[str]:
    """The image paths of ``questions`` that are not files under ``image_folder``."""
    root = image_folder or ""
    return [q["image"] for q in questions
            if q.get("image") is not None and not os.path.isfile(os.path.join(root, q["image"]))]


# ---------------------------------------------------------------------------- answers


def answer_record(question_item: Mapping, text: str, number: int, model_id: str,
                  error: Optional[str] = None) -> dict:
    """LLaVA's answer line for one eval question (plus the benchmark's extra keys)."""
    metadata: dict[str, Any] = {"category": question_item.get("category")}
    if error is not None:
        metadata["error"] = error
    record = {"question_id": question_item["question_id"], "prompt": question_item["prompt"],
              "text": text, "answer_id": f"{model_id}-{number}", "model_id": model_id,
              "metadata": metadata}
    record.update(question_item.get("extra") or {})
    return record


def default_answer_key(record: Mapping) -> str:
    return str(record["question_id"])


def align_answers(questions: list[dict], answers_path: str, answer_key=default_answer_key,
                  benchmark: str = "", question_file: str = "") -> list[Optional[dict]]:
    """The answer line of every question (None where there is none), by key.

    BenchmarkError for a line without question_id/text, a line that answers no question of
    this benchmark (naming the answers file, the line and the question file), and a question
    answered twice."""
    by_key = {q["key"]: i for i, q in enumerate(questions)}
    aligned: list[Optional[dict]] = [None] * len(questions)
    for number, record in read_jsonl_records(answers_path, "answers file"):
        where = f"answers file {answers_path}:{number}"
        require_keys(record, ("question_id", "text"), where)
        try:
            key = answer_key(record)
        except (KeyError, TypeError, ValueError) as error:
            raise BenchmarkError(f"{where}: not an answer line of {benchmark} ({error})") from None
        if key not in by_key:
            raise BenchmarkError(f"{where}: question_id {record['question_id']!r} is not a "
                                 f"question of {benchmark} ({question_file}); an answer file "
                                 "of another benchmark or split?")
        index = by_key[key]
        if aligned[index] is not None:
            raise BenchmarkError(f"{where}: question {record['question_id']!r} answered twice")
        aligned[index] = record
    return aligned


def answer_error(answer: Optional[Mapping]) -> Optional[str]:
    """The error an answer line carries (metadata "error", or a text that is not a string)."""
    if answer is None:
        return None
    metadata = answer.get("metadata")
    if isinstance(metadata, Mapping) and metadata.get("error"):
        return str(metadata["error"])
    if not isinstance(answer.get("text"), str):
        return "bad_answer_text: the answer's text is not a string"
    return None


def usable_text(answer: Optional[Mapping]) -> Optional[str]:
    """The answer's text, or None when it is missing or carries an error (scored wrong)."""
    if answer is None or answer_error(answer) is not None:
        return None
    return answer["text"]


def counts(questions: list[dict], answers: list[Optional[Mapping]]) -> dict:
    """How many questions, answers, missing answers (ids listed), errors (by kind) and
    missing images."""
    missing_ids = [q["question_id"] for q, a in zip(questions, answers) if a is None]
    kinds = Counter(error.split(":", 1)[0] for error in map(answer_error, answers) if error)
    return {"questions": len(questions), "answered": len(questions) - len(missing_ids),
            "missing": len(missing_ids), "missing_ids": missing_ids[:MAX_LISTED_IDS],
            "errors": sum(kinds.values()), "errors_by_kind": dict(sorted(kinds.items())),
            "missing_images": kinds.get(MISSING_IMAGE_KIND, 0)}


def report(benchmark: str, questions: list[dict], answers: list[Optional[Mapping]],
           metrics: dict, per_category: Optional[dict] = None, **more: Any) -> dict:
    """The result every scorer returns (JSON-serialisable)."""
    result = {"benchmark": benchmark, "metrics": metrics,
              "per_category": per_category or {}, "counts": counts(questions, answers)}
    result.update(more)
    return result


def format_report(result: Mapping) -> str:
    """Plain-text lines: the metrics, the per-category metrics, then the counts."""
    name = result["benchmark"]
    lines = [f"eval: {name} {key:>24} {_cell(value)}" for key, value in result["metrics"].items()]
    for category, values in result.get("per_category", {}).items():
        cells = ", ".join(f"{k} {_cell(v)}" for k, v in values.items())
        lines.append(f"eval: {name} {category:>24} {cells}")
    c = result["counts"]
    errors = ", ".join(f"{k} {v}" for k, v in c["errors_by_kind"].items())
    lines.append(f"eval: {name} {c['questions']} questions, {c['answered']} answered, "
                 f"missing answers {c['missing']}, errors {c['errors']}"
                 + (f" ({errors})" if errors else "")
                 + f", missing images {c['missing_images']}")
    if c["missing_ids"]:
        lines.append(f"eval: {name} missing answers, e.g. {c['missing_ids']}")
    if result.get("submission_file"):
        lines.append(f"eval: {name} submission file {result['submission_file']}")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def percent(numerator: float, denominator: float) -> float:
    """100 * numerator / denominator, 0 for an empty denominator."""
    return 100.0 * numerator / denominator if denominator else 0.0


def write_json_atomic(path: str, value: Any) -> str:
    """Write ``value`` as JSON to ``path`` via a temporary file; returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f)
    os.replace(tmp, path)
    return path
