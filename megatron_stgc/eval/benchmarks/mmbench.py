"""MMBench: multiple choice from a TSV with base64 images; option extraction, circular evaluation.

Layout (MoE-LLaVA ``docs/EVAL.md``, ``scripts/v1/eval/moe_llava/mmbench.sh``): ``eval/mmbench/
mmbench_dev_20230712.tsv``, columns ``index, question, hint, A, B, C, D, answer (dev only),
category, l2-category, source, image (base64), comment``. The images are decoded once into
``--image-folder`` (default ``eval/mmbench/images_<tsv stem>/<index>.<jpg|png|...>``).

Questions as ``moellava/eval/model_vqa_mmbench.py`` builds them (lines 78-107): the hint (when
not empty/nan/none) and a newline before the question, then one line "X. option" per option
(A.. up to the first empty one), the prompt suffix "Answer with the option's letter from the
given choices directly."; 1024 new tokens at most. Circular evaluation: every question is
asked once per option with the options rotated by one each round (the script's
``--all-rounds``, lines 82-175), the answer line carries ``round_id``, ``options`` and
``option_char`` (the original letter of each shown option) as the script writes them; a
question counts as right only when every round is right ("circular accuracy"; round 0 alone
is "single-round accuracy").

Option extraction (the exact-matching stage of VLMEvalKit's ``can_infer``: ``vlmeval/utils/
matching_util.py`` ``can_infer_option`` / ``can_infer_text``): the characters ``.()[],:;!*#{}``
become spaces; when exactly one of the shown option letters is a word of the answer, that
letter; else, when the lowercased text of exactly one option occurs in the lowercased answer,
that option; else none (wrong; VLMEvalKit would ask an LLM judge next, not done here).

Submission (test split, no answers): ``answers_upload/<model>.tsv``, the TSV's columns without
``hint, category, source, image, comment, l2-category``, with a ``prediction`` column after
the options (``scripts/convert_mmbench_for_submission.py`` lines 18-27 write the same as
.xlsx; pandas' ``read_csv(sep="\\t").to_excel`` converts it; this package writes no xlsx).
"""

from __future__ import annotations

import base64
import binascii
import csv
import math
import os
import sys
from collections import defaultdict

from megatron_stgc.eval.benchmarks.base import (OPTION_LETTER, BenchmarkError, Defaults, percent,
                                                question, report, unique_keys, usable_text,
                                                with_suffix)
from megatron_stgc.eval.benchmarks.benchmark import Benchmark

LETTERS = ("A", "B", "C", "D")
REQUIRED = ("index", "question") + LETTERS[:2] + ("image",)
DROPPED_FOR_SUBMISSION = ("hint", "category", "source", "image", "comment", "l2-category")
_STRIPPED = ".()[],:;!*#{}"
_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG", "png"), (b"GIF8", "gif"), (b"BM", "bmp"),
          (b"RIFF", "webp"))


def is_none(value) -> bool:
    """An empty cell (model_vqa_mmbench.py's is_none: None, nan, "nan", "none")."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none")


def read_tsv(path: str) -> tuple[list[str], list[tuple[int, dict]]]:
    """(columns, [(row number, {column: cell})]); BenchmarkError naming the file and row."""
    if not os.path.isfile(path):
        raise BenchmarkError(f"question file {path} does not exist")
    csv.field_size_limit(sys.maxsize)  # base64 images are long cells
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None or any(c not in header for c in REQUIRED):
            raise BenchmarkError(f"question file {path}: header {header!r} lacks "
                                 f"{[c for c in REQUIRED if c not in (header or [])]}; "
                                 "not MMBench's TSV layout")
        rows = []
        for number, cells in enumerate(reader, start=2):
            if len(cells) != len(header):
                raise BenchmarkError(f"question file {path} row {number}: {len(cells)} cells, "
                                     f"the header has {len(header)}")
            rows.append((number, dict(zip(header, cells))))
    return header, rows


def shown_options(row: dict) -> list[str]:
    options = []
    for letter in LETTERS:
        if is_none(row.get(letter)):
            break
        options.append(row[letter])
    return options


def mmbench_question_text(row: dict, options: list[str]) -> str:
    text = row["question"] if is_none(row.get("hint")) else f"{row['hint']}\n{row['question']}"
    for letter, option in zip(LETTERS, options):
        text += f"\n{letter}. {option}"
    return text


def extract_option(answer: str, options: dict[str, str]) -> str | None:
    """The letter of ``options`` ({letter: text}) that ``answer`` picks, or None."""
    cleaned = answer
    for character in _STRIPPED:
        cleaned = cleaned.replace(character, " ")
    words = cleaned.split()
    named = [letter for letter in options if letter in words]
    if len(named) == 1:
        return named[0]
    lowered = answer.lower()
    by_text = [letter for letter, text in options.items() if str(text).lower() in lowered]
    return by_text[0] if len(by_text) == 1 else None


def image_name(row: dict, number: int, path: str) -> str:
    """``<index>.<ext>``, the extension from the first bytes of the base64 image."""
    cell = row.get("image") or ""
    try:
        head = base64.b64decode(cell[:24], validate=False) if len(cell) >= 24 else b""
    except (binascii.Error, ValueError):
        head = b""
    if not head:
        raise BenchmarkError(f"question file {path} row {number}: no base64 image in 'image'")
    return f"{row['index']}." + next((ext for magic, ext in _MAGIC if head.startswith(magic)),
                                     "img")


class MMBench(Benchmark):
    name = "mmbench"
    defaults = Defaults("mmbench_dev_20230712.tsv", None, None, OPTION_LETTER, 1024,
                        submission="{model_id}.tsv")

    def files(self, benchmark_dir, **kwargs):
        files = super().files(benchmark_dir, **kwargs)
        if files.image_folder is None and files.question_file is not None:
            stem = os.path.splitext(os.path.basename(files.question_file))[0]
            files.image_folder = os.path.join(os.path.dirname(files.question_file),
                                              f"images_{stem}")
        return files

    def read_questions(self, files):
        _, rows = read_tsv(files.question_file)
        suffix, questions = self.suffix(files), []
        for number, row in rows:
            options = shown_options(row)
            if len(options) < 2:
                raise BenchmarkError(f"question file {files.question_file} row {number}: fewer "
                                     "than two options (columns A, B)")
            letters = list(LETTERS[:len(options)])
            for round_id in range(len(options)):
                shown, chars = options[round_id:] + options[:round_id], \
                    letters[round_id:] + letters[:round_id]
                text = mmbench_question_text(row, shown)
                questions.append(question(
                    f"{row['index']}\x00{round_id}", _index(row["index"]),
                    with_suffix(text, suffix), prompt=text, image=image_name(row, number,
                                                                             files.question_file),
                    category=row.get("category") or None, round_id=round_id, options=shown,
                    option_char=chars))
        unique_keys(questions, files.question_file)
        return questions

    def answer_key(self, record):
        if "round_id" not in record:
            raise KeyError("no 'round_id' (MMBench answer lines carry one)")
        return f"{record['question_id']}\x00{record['round_id']}"

    def prepare_images(self, questions, files):
        """Decode the TSV's images into the image folder (once: a file of the right size is
        kept), under the names the questions already carry."""
        _, rows = read_tsv(files.question_file)
        os.makedirs(files.image_folder, exist_ok=True)
        for number, row in rows:
            try:
                data = base64.b64decode(row["image"], validate=False)
            except (binascii.Error, ValueError) as error:
                raise BenchmarkError(f"question file {files.question_file} row {number}: the "
                                     f"image is not base64 ({error})") from None
            path = os.path.join(files.image_folder, image_name(row, number, files.question_file))
            if os.path.isfile(path) and os.path.getsize(path) == len(data):
                continue
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)

    def score(self, questions, answers, files):
        _, rows = read_tsv(files.question_file)
        truth = {str(row["index"]): row.get("answer") for _, row in rows}
        if any(is_none(answer) or answer not in LETTERS for answer in truth.values()):
            return super().score(questions, answers, files)  # the test split: no answers
        rounds = defaultdict(list)
        for q, a in zip(questions, answers):
            extra = q["extra"]
            text = usable_text(a)
            picked = None if text is None else extract_option(
                text, dict(zip(LETTERS, extra["options"])))
            original = None if picked is None else extra["option_char"][LETTERS.index(picked)]
            rounds[str(q["question_id"])].append((extra["round_id"], original == truth[str(
                q["question_id"])], q["category"]))
        return _circular_report(self.name, questions, answers, rounds)

    def submission(self, questions, answers, files):
        if files.submission_file is None:
            return None
        header, rows = read_tsv(files.question_file)
        first = {str(q["question_id"]): usable_text(a) or ""
                 for q, a in zip(questions, answers) if q["extra"]["round_id"] == 0}
        columns = [c for c in header if c not in DROPPED_FOR_SUBMISSION]
        at = max(columns.index(c) for c in LETTERS if c in columns) + 1
        columns.insert(at, "prediction")
        os.makedirs(os.path.dirname(os.path.abspath(files.submission_file)), exist_ok=True)
        tmp = f"{files.submission_file}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, delimiter="\t")
            writer.writerow(columns)
            for _, row in rows:
                row = dict(row, prediction=first.get(str(_index(row["index"])), ""))
                writer.writerow([row.get(c, "") for c in columns])
        os.replace(tmp, files.submission_file)
        return files.submission_file


def _index(value: str):
    """The TSV's index as the answer lines carry it (an int when it is one, as pandas reads)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


def _circular_report(name, questions, answers, rounds) -> dict:
    circular, single = [], []
    by_category = defaultdict(list)
    for results in rounds.values():
        hit = all(right for _, right, _ in results)
        circular.append(hit)
        single.append(next(right for r, right, _ in results if r == 0))
        by_category[results[0][2]].append(hit)
    per_category = {str(c): {"circular accuracy": percent(sum(v), len(v)), "questions": len(v)}
                    for c, v in sorted(by_category.items(), key=lambda item: str(item[0]))}
    return report(name, questions, answers,
                  {"circular accuracy": percent(sum(circular), len(circular)),
                   "single-round accuracy": percent(sum(single), len(single)),
                   "questions": len(circular)}, per_category)
