"""POPE: yes/no object-hallucination questions; accuracy, precision, recall, F1, yes-ratio per split.

Layout (MoE-LLaVA ``docs/EVAL.md``, ``scripts/v1/eval/moe_llava/pope.sh``): ``eval/pope/
llava_pope_test.jsonl`` (``category`` = the split: adversarial / popular / random), images
``val2014/``, labels ``coco/coco_pope_<split>.json`` (JSON Lines with ``"label": "yes"|"no"``).

As ``moellava/eval/eval_pope.py`` does (lines 5-80): each split's answers, in question-file
order, pair with its label file's lines in order; an answer is cut at its first "." and its
commas removed, and is "no" when its words hold "No", "not" or "no", else "yes"; positive =
yes. Here the pairing is checked (same number of questions, same image per pair: a label file
of another question set is an error naming the record), a missing or failed answer counts as
the wrong answer (the script would pair the next answer with it), and an empty denominator
gives 0 where the script divides by zero. A split with a label file but no question in the
question file is left out. The mean of the splits' metrics is reported too.
"""

from __future__ import annotations

import os
from collections import defaultdict

from megatron_stgc.eval.benchmarks.base import (SHORT_ANSWER, BenchmarkError, Defaults, percent,
                                                read_jsonl_records, report, usable_text)
from megatron_stgc.eval.benchmarks.benchmark import Benchmark
from megatron_stgc.eval.benchmarks.llava_questions import read_llava_questions

LABEL_PREFIX, LABEL_SUFFIX = "coco_pope_", ".json"
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def pope_says_yes(text: str) -> bool:
    """eval_pope.py's reading of an answer (lines 9-20)."""
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split(" ")
    return not ("No" in words or "not" in words or "no" in words)


def pope_metrics(predictions: list[bool], labels: list[bool]) -> dict:
    """Metrics in % (yes_ratio too) and the confusion counts; positive = yes."""
    tp = sum(p and l for p, l in zip(predictions, labels))
    fp = sum(p and not l for p, l in zip(predictions, labels))
    tn = sum(not p and not l for p, l in zip(predictions, labels))
    fn = sum(not p and l for p, l in zip(predictions, labels))
    precision, recall = percent(tp, tp + fp), percent(tp, tp + fn)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": percent(tp + tn, len(labels)), "precision": precision, "recall": recall,
            "f1": f1, "yes_ratio": percent(sum(predictions), len(predictions)),
            "TP": tp, "FP": fp, "TN": tn, "FN": fn, "questions": len(labels)}


def read_labels(folder: str) -> dict[str, list[tuple[str, bool, str]]]:
    """{split: [(image, label is yes, where)]} from coco_pope_<split>.json files."""
    if not os.path.isdir(folder):
        raise BenchmarkError(f"annotations {folder}: not a folder of coco_pope_<split>.json files")
    splits = {}
    for name in sorted(os.listdir(folder)):
        if not (name.startswith(LABEL_PREFIX) and name.endswith(LABEL_SUFFIX)):
            continue
        path = os.path.join(folder, name)
        rows = []
        for number, record in read_jsonl_records(path, "label file"):
            where = f"label file {path}:{number}"
            if record.get("label") not in ("yes", "no") or "image" not in record:
                raise BenchmarkError(f"{where}: expected {{\"image\", \"label\": \"yes\"|\"no\"}}")
            rows.append((str(record["image"]), record["label"] == "yes", where))
        splits[name[len(LABEL_PREFIX):-len(LABEL_SUFFIX)]] = rows
    if not splits:
        raise BenchmarkError(f"annotations {folder}: no {LABEL_PREFIX}<split>{LABEL_SUFFIX} file")
    return splits


class POPE(Benchmark):
    name = "pope"
    defaults = Defaults("llava_pope_test.jsonl", "val2014", "coco", SHORT_ANSWER, 128)

    def read_questions(self, files):
        return read_llava_questions(files.question_file, self.suffix(files))

    def score(self, questions, answers, files):
        if files.annotations is None:
            return super().score(questions, answers, files)
        by_split = defaultdict(list)
        for q, a in zip(questions, answers):
            by_split[q["category"]].append((q, a))
        per_split = {}
        for split, labels in read_labels(files.annotations).items():
            pairs = by_split.pop(split, [])
            if not pairs:  # a split this question file does not ask
                continue
            if len(pairs) != len(labels):
                raise BenchmarkError(f"question file {files.question_file}: {len(pairs)} questions "
                                     f"of split {split!r}, its label file has {len(labels)}")
            predictions = [_prediction(q, a, label, image, where, files.question_file)
                           for (q, a), (image, label, where) in zip(pairs, labels)]
            per_split[split] = pope_metrics(predictions, [label for _, label, _ in labels])
        if by_split:
            raise BenchmarkError(f"question file {files.question_file}: categories "
                                 f"{sorted(map(str, by_split))} have no label file in "
                                 f"{files.annotations}")
        if not per_split:
            raise BenchmarkError(f"annotations {files.annotations}: no label file for any split "
                                 f"of {files.question_file}")
        mean = {m: sum(s[m] for s in per_split.values()) / len(per_split) for m in METRICS}
        return report(self.name, questions, answers, {f"mean {m}": v for m, v in mean.items()},
                      per_split)


def _prediction(q: dict, answer, label: bool, label_image: str, where: str,
                question_file: str) -> bool:
    """The answer read as yes/no; a missing or failed answer is the wrong one."""
    if os.path.basename(q["image"]) != os.path.basename(label_image):
        raise BenchmarkError(f"{where}: image {label_image!r}, but the question it pairs with "
                             f"({q['question_id']!r} in {question_file}) has {q['image']!r}")
    text = usable_text(answer)
    return (not label) if text is None else pope_says_yes(text)
