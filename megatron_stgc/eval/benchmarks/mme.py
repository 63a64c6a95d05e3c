"""MME: yes/no questions, two per image; acc and acc+ per subtask, perception and cognition sums.

Layout (MoE-LLaVA ``docs/EVAL.md``, ``scripts/v1/eval/moe_llava/mme.sh``): ``eval/MME/
llava_mme.jsonl`` (question_id = ``<subtask>/<image file>``, the same id for both questions of
an image), images and ground truth in ``MME_Benchmark_release_version/<subtask>/``: either
``images/`` + ``questions_answers_YN/<image stem>.txt`` or image and ``.txt`` side by side;
each ``.txt`` line is ``question<TAB>Yes|No``.

Written from the facts of LLaVA's ``convert_answer_to_mme.py`` and MME's ``eval_tool/
calculation.py`` (shipped in LLaVA's eval.zip, not in MoE-LLaVA's repository): a question
finds its ground truth by (subtask, image stem, question) where the question is the prompt
without "Answer the question using a single word or phrase." and, when it lacks it, with
" Please answer yes or no." appended (or the two-space variant); an answer is lowercased and
read as "yes"/"no" when it is exactly that, else by "yes" (first) or "no" appearing in its
first 4 characters, else "other" (wrong). Per subtask: acc = % of questions right, acc+ = %
of images with every question right, score = acc + acc+; perception = the sum of the 10
perception subtasks' scores, cognition of the 4 cognition subtasks (sums over the subtasks
present; the missing ones are listed). calculation.py pairs consecutive lines; here the
questions of an image are grouped by image, and a missing or failed answer is "other".
"""

from __future__ import annotations

import os
from collections import defaultdict

from megatron_stgc.eval.benchmarks.base import (SHORT_ANSWER, BenchmarkError, Defaults, percent,
                                                report, usable_text, without_suffix)
from megatron_stgc.eval.benchmarks.benchmark import Benchmark
from megatron_stgc.eval.benchmarks.llava_questions import (by_question_id_and_prompt,
                                                           read_llava_questions)

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
              "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
             "code_reasoning")
YES_OR_NO = "Please answer yes or no."


def mme_reading(text: str) -> str:
    """calculation.py's parse_pred_ans on the lowercased answer: yes / no / other."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    if "yes" in text[:4]:
        return "yes"
    if "no" in text[:4]:
        return "no"
    return "other"


def read_ground_truth(root: str) -> dict[tuple[str, str, str], str]:
    """{(subtask, image stem, question): "yes"|"no"} from MME_Benchmark_release_version."""
    if not os.path.isdir(root):
        raise BenchmarkError(f"annotations {root}: not MME_Benchmark_release_version's folder")
    truth = {}
    for subtask in sorted(os.listdir(root)):
        folder = os.path.join(root, subtask)
        if not os.path.isdir(folder):
            continue
        qa = os.path.join(folder, "questions_answers_YN")
        qa = qa if os.path.isdir(os.path.join(folder, "images")) else folder
        for name in sorted(os.listdir(qa)) if os.path.isdir(qa) else []:
            if name.endswith(".txt"):
                truth.update(_read_pairs(os.path.join(qa, name), subtask, name[:-4]))
    if not truth:
        raise BenchmarkError(f"annotations {root}: no <subtask>/(questions_answers_YN/)*.txt file")
    return truth


def _read_pairs(path: str, subtask: str, stem: str) -> dict:
    pairs = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.strip().split("\t")
            if len(parts) != 2 or parts[1].lower() not in ("yes", "no"):
                raise BenchmarkError(f"ground truth {path}:{number}: expected "
                                     "'question<TAB>Yes|No'")
            pairs[(subtask, stem, parts[0])] = parts[1].lower()
    return pairs


def truth_key(question_id: str, prompt: str, truth: dict) -> tuple[str, str, str]:
    """The ground-truth key of one question (convert_answer_to_mme.py's lookup rules)."""
    subtask = str(question_id).split("/")[0]
    stem = os.path.splitext(os.path.basename(str(question_id)))[0]
    text = without_suffix(prompt, SHORT_ANSWER).strip()
    if YES_OR_NO not in text:
        text = f"{text} {YES_OR_NO}"
        if (subtask, stem, text) not in truth:
            text = text.replace(f" {YES_OR_NO}", f"  {YES_OR_NO}")
    return subtask, stem, text


class MME(Benchmark):
    name = "mme"
    defaults = Defaults("llava_mme.jsonl", "MME_Benchmark_release_version",
                        "MME_Benchmark_release_version", SHORT_ANSWER, 128)

    def read_questions(self, files):
        return read_llava_questions(files.question_file, self.suffix(files),
                                    key_of=by_question_id_and_prompt)

    def answer_key(self, record):
        return by_question_id_and_prompt(record)

    def score(self, questions, answers, files):
        if files.annotations is None:
            return super().score(questions, answers, files)
        truth = read_ground_truth(files.annotations)
        right = defaultdict(list)  # subtask -> [0/1 per question]
        per_image = defaultdict(list)  # (subtask, stem) -> [0/1]
        for number, (q, a) in enumerate(zip(questions, answers)):
            key = truth_key(q["question_id"], q["prompt"], truth)
            if key not in truth:
                raise BenchmarkError(f"question file {files.question_file} record {number + 1}: "
                                     f"no ground truth for {key[2]!r} of image {key[1]!r} in "
                                     f"{files.annotations}/{key[0]}")
            text = usable_text(a)
            hit = int(text is not None and mme_reading(text) == truth[key])
            right[key[0]].append(hit)
            per_image[key[:2]].append(hit)
        return self._report(questions, answers, right, per_image)

    def _report(self, questions, answers, right, per_image) -> dict:
        subtasks = {}
        for subtask, hits in sorted(right.items()):
            images = [all(v) for (s, _), v in per_image.items() if s == subtask]
            acc, acc_plus = percent(sum(hits), len(hits)), percent(sum(images), len(images))
            subtasks[subtask] = {"acc": acc, "acc+": acc_plus, "score": acc + acc_plus}
        metrics = {}
        for group, names in (("perception", PERCEPTION), ("cognition", COGNITION)):
            present = [n for n in names if n in subtasks]
            metrics[group] = sum(subtasks[n]["score"] for n in present)
            metrics[f"{group} subtasks"] = f"{len(present)}/{len(names)}"
        other = sorted(set(subtasks) - set(PERCEPTION) - set(COGNITION))
        return report(self.name, questions, answers, metrics, subtasks,
                      absent_subtasks=[n for n in PERCEPTION + COGNITION if n not in subtasks],
                      unknown_subtasks=other)
