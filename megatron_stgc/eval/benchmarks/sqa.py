"""ScienceQA (the image subset, SQA-IMG): multiple choice answered with an option letter.

Layout (MoE-LLaVA ``docs/EVAL.md``, ``scripts/v1/eval/moe_llava/sqa.sh``): ``eval/scienceqa/
llava_test_CQM-A.json`` (a JSON list of LLaVA conversation records ``{"id", "image"
(optional), "conversations": [{"from": "human", "value": "<image>\\nContext: ...\\nOptions:
(A) ..."}, ...]}``), images ``images/test/``, ground truth ``problems.json`` and
``pid_splits.json`` from the ScienceQA repository, in the benchmark folder (``--annotations``:
that folder or its problems.json).

Questions as ``moellava/eval/model_vqa_science.py`` builds them (lines 48-75): the human turn
without ``<image>``, stripped, plus "\\n" and "Answer with the option's letter from the given
choices directly." (--single-pred-prompt); the answer line's prompt starts with "<image>\\n"
for a question with an image; 1024 new tokens at most. Scored as
``moellava/eval/eval_science_qa.py`` (lines 57-97): the answer is an option letter when it is
one of A-E, or starts with "X. ", or holds exactly one "The answer is X."; it is right when
that letter is the problem's answer among its choices. "img accuracy" (the paper's SQA-IMG)
counts the test problems with an image; the script finds those by "<image>" in the recorded
prompt, which leaves missing answers out, here they come from problems.json and score 0.
"""

from __future__ import annotations

import os
import re

from megatron_stgc.eval.benchmarks.base import (OPTION_LETTER, BenchmarkError, Defaults, percent,
                                                question, read_json, report, unique_keys,
                                                usable_text, with_suffix)
from megatron_stgc.eval.benchmarks.benchmark import Benchmark

OPTIONS = ("A", "B", "C", "D", "E")
_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
IMAGE_TAG = "<image>"


def sqa_letter(text: str) -> str:
    """The option letter an answer gives, or "FAILED"."""
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _THE_ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def _human_turn(record: dict, where: str) -> str:
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict) \
            or not isinstance(turns[0].get("value"), str):
        raise BenchmarkError(f"{where}: no 'conversations' whose first turn has a text 'value'; "
                             "not ScienceQA's llava_test_CQM-A.json layout")
    return turns[0]["value"]


class ScienceQA(Benchmark):
    name = "sqa-img"
    defaults = Defaults("llava_test_CQM-A.json", "images/test", "problems.json", OPTION_LETTER,
                        1024)

    def read_questions(self, files):
        path = files.question_file
        records = read_json(path, "question file")
        if not isinstance(records, list):
            raise BenchmarkError(f"question file {path}: expected a JSON list of conversation "
                                 "records (llava_test_CQM-A.json)")
        suffix, questions = self.suffix(files), []
        for number, record in enumerate(records, start=1):
            where = f"question file {path} record {number}"
            if not isinstance(record, dict) or "id" not in record:
                raise BenchmarkError(f"{where}: no 'id'; not llava_test_CQM-A.json's layout")
            text = _human_turn(record, where).replace(IMAGE_TAG, "").strip()
            image = record.get("image")
            prompt = with_suffix(f"{IMAGE_TAG}\n{text}" if image else text, suffix)
            questions.append(question(str(record["id"]), record["id"], with_suffix(text, suffix),
                                      prompt=prompt, image=image or None,
                                      category="image" if image else "no image"))
        unique_keys(questions, path)
        return questions

    def score(self, questions, answers, files):
        if files.annotations is None:
            return super().score(questions, answers, files)
        folder = files.annotations if os.path.isdir(files.annotations) else os.path.dirname(
            files.annotations)
        problems = read_json(os.path.join(folder, "problems.json"), "annotations")
        splits = read_json(os.path.join(folder, "pid_splits.json"), "annotations")
        if not isinstance(problems, dict) or not isinstance(splits, dict) or "test" not in splits:
            raise BenchmarkError(f"annotations {folder}: expected ScienceQA's "
                                 "problems.json {pid: {...}} and pid_splits.json {\"test\": [...]}")
        by_id = {q["key"]: a for q, a in zip(questions, answers)}
        hits, image_hits = [], []
        for pid in splits["test"]:
            problem = problems.get(str(pid))
            if not isinstance(problem, dict) or "answer" not in problem:
                raise BenchmarkError(f"annotations {folder}/problems.json: no problem "
                                     f"{pid!r} of the test split")
            text = usable_text(by_id.get(str(pid)))
            letter = "FAILED" if text is None else sqa_letter(text)
            choices = OPTIONS[:len(problem.get("choices", []))]
            hit = int(letter in choices and choices.index(letter) == problem["answer"])
            hits.append(hit)
            if problem.get("image"):
                image_hits.append(hit)
        unknown = sorted(set(by_id) - {str(pid) for pid in splits["test"]})
        if unknown:
            raise BenchmarkError(f"question file {files.question_file}: questions {unknown[:5]} "
                                 "are not in pid_splits.json's test split")
        return report(self.name, questions, answers,
                      {"img accuracy": percent(sum(image_hits), len(image_hits)),
                       "accuracy": percent(sum(hits), len(hits)),
                       "img problems": len(image_hits), "problems": len(hits)})
