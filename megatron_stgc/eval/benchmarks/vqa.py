"""VQAv2, VizWiz and TextVQA: short answers scored with the VQA soft accuracy.

Layouts (MoE-LLaVA ``docs/EVAL.md`` and ``scripts/v1/eval/moe_llava/{vqav2,vizwiz,textvqa}.sh``):

* VQAv2 ``eval/vqav2``: ``llava_vqav2_mscoco_test-dev2015.jsonl``, images ``test2015/``. Test-dev
  has no public answers: the submission file for the EvalAI server is
  ``answers_upload/<model>.json``, ``[{"question_id", "answer"}]`` over every question of
  ``llava_vqav2_mscoco_test2015.jsonl`` when that file is present ("" for the ones not
  asked), answers normalised (``scripts/convert_vqav2_for_submission.py`` lines 20-53). A val
  split in the same layout is scored with ``--annotations`` = the official
  ``v2_mscoco_val2014_annotations.json`` (per answer type).
* VizWiz ``eval/vizwiz``: ``llava_test.jsonl``, images ``test/``; submission
  ``answers_upload/<model>.json``, ``[{"image", "answer"}]`` in question order
  (``scripts/convert_vizwiz_for_submission.py`` lines 39-44). A val split is scored with
  ``--annotations`` = VizWiz's ``val.json`` (records matched by image file name).
* TextVQA ``eval/textvqa``: ``llava_textvqa_val_v051_ocr.jsonl`` (question_id = the TextVQA
  image id; several questions per image), images ``train_images/``, scored against
  ``TextVQA_0.5.1_val.json`` by (image id, question) as ``moellava/eval/eval_textvqa.py``
  lines 17-47 match them.

Every question counts: a missing or failed answer scores 0 (the TextVQA script averages over
the answers present only).
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from typing import Optional

from megatron_stgc.eval.benchmarks.base import (SHORT_ANSWER, BenchmarkError, Defaults,
                                                read_json, read_jsonl_records, report,
                                                usable_text, write_json_atomic)
from megatron_stgc.eval.benchmarks.benchmark import Benchmark
from megatron_stgc.eval.benchmarks.llava_questions import (by_question_id_and_prompt,
                                                           read_llava_questions)
from megatron_stgc.eval.benchmarks.vqa_metric import normalize, soft_accuracy

# LLaVA-1.5's VizWiz response format (arXiv 2310.03744, Table 7), carried by llava_test.jsonl
VIZWIZ_SUFFIX = ("When the provided information is insufficient, respond with 'Unanswerable'.\n"
                 + SHORT_ANSWER)
VQAV2_FULL_TEST = "llava_vqav2_mscoco_test2015.jsonl"


def soft_scores(questions: list[dict], answers: list[Optional[dict]], references: list[list[str]],
                types: list[Optional[str]], name: str) -> dict:
    """The report: mean soft accuracy (in %) overall and per answer type."""
    scores = [0.0 if usable_text(a) is None else soft_accuracy(usable_text(a), refs)
              for a, refs in zip(answers, references)]
    by_type: dict[str, list[float]] = defaultdict(list)
    for value, kind in zip(scores, types):
        if kind is not None:
            by_type[kind].append(value)
    per_type = {kind: {"accuracy": 100 * sum(v) / len(v), "questions": len(v)}
                for kind, v in sorted(by_type.items())}
    return report(name, questions, answers, {"accuracy": 100 * sum(scores) / len(scores)},
                  per_type)


def _answer_strings(record: dict, where: str) -> list[str]:
    answers = record.get("answers")
    if not isinstance(answers, list) or not answers:
        raise BenchmarkError(f"{where}: 'answers' is not a list of annotator answers")
    return [a["answer"] if isinstance(a, dict) else a for a in answers]


class VQAv2(Benchmark):
    name = "vqav2"
    defaults = Defaults("llava_vqav2_mscoco_test-dev2015.jsonl", "test2015", None, SHORT_ANSWER,
                        128, submission="{model_id}.json")

    def read_questions(self, files):
        return read_llava_questions(files.question_file, self.suffix(files))

    def score(self, questions, answers, files):
        if files.annotations is None:
            return super().score(questions, answers, files)
        data = read_json(files.annotations, "annotations")
        if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
            raise BenchmarkError(f"annotations {files.annotations}: expected VQA's "
                                 "{\"annotations\": [...]} layout")
        by_id = {str(a.get("question_id")): a for a in data["annotations"]}
        refs, types = [], []
        for q in questions:
            record = by_id.get(str(q["question_id"]))
            if record is None:
                raise BenchmarkError(f"annotations {files.annotations}: no question_id "
                                     f"{q['question_id']!r} of {files.question_file}")
            refs.append(_answer_strings(record, f"annotations {files.annotations} question "
                                                f"{q['question_id']!r}"))
            types.append(record.get("answer_type"))
        return soft_scores(questions, answers, refs, types, self.name)

    def submission(self, questions, answers, files):
        if files.submission_file is None:
            return None
        given = {str(q["question_id"]): usable_text(a) or "" for q, a in zip(questions, answers)}
        full_test = os.path.join(os.path.dirname(files.question_file), VQAV2_FULL_TEST)
        ids = [q["question_id"] for q in questions]
        if os.path.isfile(full_test) and os.path.abspath(full_test) != os.path.abspath(
                files.question_file):
            ids = [r.get("question_id") for _, r in read_jsonl_records(full_test, "question file")]
        rows = [{"question_id": i, "answer": normalize(given.get(str(i), ""))} for i in ids]
        return write_json_atomic(files.submission_file, rows)


class VizWiz(Benchmark):
    name = "vizwiz"
    defaults = Defaults("llava_test.jsonl", "test", None, VIZWIZ_SUFFIX, 128,
                        submission="{model_id}.json")

    def read_questions(self, files):
        return read_llava_questions(files.question_file, self.suffix(files))

    def score(self, questions, answers, files):
        if files.annotations is None:
            return super().score(questions, answers, files)
        data = read_json(files.annotations, "annotations")
        if not isinstance(data, list):
            raise BenchmarkError(f"annotations {files.annotations}: expected VizWiz's list of "
                                 "{\"image\", \"answers\", ...} records")
        by_image = {os.path.basename(str(r.get("image"))): r for r in data}
        refs, types = [], []
        for q in questions:
            record = by_image.get(os.path.basename(q["image"]))
            if record is None:
                raise BenchmarkError(f"annotations {files.annotations}: no image {q['image']!r} "
                                     f"(question {q['question_id']!r} of {files.question_file})")
            refs.append(_answer_strings(record, f"annotations {files.annotations} image "
                                                f"{q['image']!r}"))
            types.append(record.get("answer_type"))
        return soft_scores(questions, answers, refs, types, self.name)

    def submission(self, questions, answers, files):
        if files.submission_file is None:
            return None
        rows = [{"image": q["image"], "answer": normalize(usable_text(a) or "")}
                for q, a in zip(questions, answers)]
        return write_json_atomic(files.submission_file, rows)


_OCR_QUESTION = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)


def textvqa_question(prompt: str) -> str:
    """The question inside a TextVQA prompt, lowercased (eval_textvqa.py's prompt_processor,
    lines 17-32; a prompt of one line is taken whole)."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = _OCR_QUESTION.search(prompt)
        if match is None:
            raise ValueError("an 'OCR tokens:' prompt without 'Question: ... Short answer:'")
        found = match.group(1)
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        found = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) in (1, 2):
        found = lines[0]
    else:
        raise ValueError(f"a prompt of {len(lines)} lines")
    return found.lower()


class TextVQA(Benchmark):
    name = "textvqa"
    defaults = Defaults("llava_textvqa_val_v051_ocr.jsonl", "train_images",
                        "TextVQA_0.5.1_val.json", SHORT_ANSWER, 128)

    def read_questions(self, files):
        return read_llava_questions(files.question_file, self.suffix(files),
                                    key_of=by_question_id_and_prompt)

    def answer_key(self, record):
        return by_question_id_and_prompt(record)

    def score(self, questions, answers, files):
        if files.annotations is None:
            return super().score(questions, answers, files)
        data = read_json(files.annotations, "annotations")
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise BenchmarkError(f"annotations {files.annotations}: expected TextVQA's "
                                 "{\"data\": [...]} layout")
        by_key = {(str(r.get("image_id")), str(r.get("question", "")).lower()): r
                  for r in data["data"]}
        refs = []
        for number, q in enumerate(questions):
            where = f"question file {files.question_file} record {number + 1}"
            try:
                key = (str(q["question_id"]), textvqa_question(q["prompt"]))
            except ValueError as error:
                raise BenchmarkError(f"{where}: not a TextVQA prompt ({error})") from None
            if key not in by_key:
                raise BenchmarkError(f"annotations {files.annotations}: no question {key[1]!r} "
                                     f"for image {key[0]!r} ({where})")
            refs.append(_answer_strings(by_key[key], f"annotations {files.annotations} "
                                                     f"image {key[0]!r}"))
        return soft_scores(questions, answers, refs, [None] * len(questions), self.name)
