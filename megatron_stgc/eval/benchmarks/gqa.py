"""GQA test-dev balanced: exact match against the official questions' answers.

Layout (MoE-LLaVA ``scripts/v1/eval/moe_llava/gqa.sh``): ``eval/gqa/llava_gqa_testdev_balanced.jsonl``,
images ``data/images/``, ground truth GQA's ``testdev_balanced_questions.json``
(``{question id: {"answer", "isBalanced", "types": {"structural", "semantic"}, ...}}``) under
``data/questions1.2/`` (or given with ``--annotations``).

Scoring as ``moellava/eval/eval_gqa.py`` computes accuracy (lines 383-403): over the balanced
questions, the prediction ``text.rstrip('.').lower()`` (``scripts/convert_gqa_for_eval.py``
line 14) must equal the answer; "binary" / "open" split by structural type "query" = open.
The official script stops at a missing prediction; here it scores 0 and is counted. The
predictions are also written in the official script's input layout
(``[{"questionId", "prediction"}]``, ``<answers file stem>_testdev_balanced_predictions.json``
next to the answers file) so ``eval_gqa.py --predictions`` can be run on them.
"""

from __future__ import annotations

import os
from collections import defaultdict

from megatron_stgc.eval.benchmarks.base import (SHORT_ANSWER, BenchmarkError, Defaults, percent,
                                                read_json, report, usable_text,
                                                write_json_atomic)
from megatron_stgc.eval.benchmarks.benchmark import Benchmark
from megatron_stgc.eval.benchmarks.llava_questions import read_llava_questions

PREDICTIONS_SUFFIX = "_testdev_balanced_predictions.json"


def gqa_prediction(text: str) -> str:
    return text.rstrip(".").lower()


class GQA(Benchmark):
    name = "gqa"
    defaults = Defaults("llava_gqa_testdev_balanced.jsonl", "data/images",
                        "data/questions1.2/testdev_balanced_questions.json", SHORT_ANSWER, 128)

    def read_questions(self, files):
        return read_llava_questions(files.question_file, self.suffix(files))

    def score(self, questions, answers, files):
        if files.annotations is None:
            return super().score(questions, answers, files)
        truth = read_json(files.annotations, "annotations")
        if not isinstance(truth, dict):
            raise BenchmarkError(f"annotations {files.annotations}: expected GQA's "
                                 "{question id: {\"answer\", ...}} layout")
        hits: dict[str, list[int]] = defaultdict(list)
        for q, a in zip(questions, answers):
            record = truth.get(str(q["question_id"]))
            if not isinstance(record, dict) or "answer" not in record:
                raise BenchmarkError(f"annotations {files.annotations}: no question "
                                     f"{q['question_id']!r} of {files.question_file}")
            if not record.get("isBalanced", True):
                continue
            text = usable_text(a)
            hit = int(text is not None and gqa_prediction(text) == record["answer"])
            structural = (record.get("types") or {}).get("structural")
            hits["accuracy"].append(hit)
            hits["open" if structural == "query" else "binary"].append(hit)
        metrics = {key: percent(sum(hits[key]), len(hits[key]))
                   for key in ("accuracy", "binary", "open")}
        metrics["balanced questions"] = len(hits["accuracy"])
        return report(self.name, questions, answers, metrics)

    def submission(self, questions, answers, files):
        """The official evaluator's predictions file, next to the answers file."""
        if files.answers_file is None:
            return None
        path = os.path.splitext(files.answers_file)[0] + PREDICTIONS_SUFFIX
        rows = [{"questionId": q["question_id"], "prediction": gqa_prediction(usable_text(a) or "")}
                for q, a in zip(questions, answers)]
        return write_json_atomic(path, rows)
