"""LLaVA's ``model_vqa_loader`` question files (JSON Lines), which most benchmarks use.

One record per line: ``{"question_id", "image", "text", "category" (optional)}``; ``text``
without the ``<image>`` tag (MoE-LLaVA's ``moellava/eval/model_vqa_loader.py`` lines 40-51
reads ``image`` and ``text`` and puts ``<image>\\n`` in front). The answer line records the
file's ``text`` as its ``prompt`` (same file, line 103) while the model is asked the text
with the benchmark's suffix (``base.with_suffix``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Optional

from megatron_stgc.eval.benchmarks.base import (BenchmarkError, question, read_jsonl_records,
                                                require_keys, unique_keys, with_suffix)

KeyOf = Callable[[Mapping], str]


def by_question_id(record: Mapping) -> str:
    return str(record["question_id"])


def by_question_id_and_prompt(record: Mapping) -> str:
    """For files where one question_id holds several questions (MME: the image path;
    TextVQA: the image id): the id and the recorded prompt."""
    prompt = record.get("prompt")
    if not isinstance(prompt, str):
        raise KeyError("no 'prompt' to tell the image's questions apart")
    return f"{record['question_id']}\x00{prompt}"


def read_llava_questions(path: str, suffix: str, *, key_of: KeyOf = by_question_id,
                         needs_image: bool = True,
                         check: Optional[Callable[[dict, str], None]] = None) -> list[dict]:
    """Eval questions of a model_vqa_loader file. ``needs_image``: a record without "image"
    is an error (every question of these benchmarks has one). ``check(record, where)``:
    more per-record checks of the benchmark."""
    questions = []
    for number, record in read_jsonl_records(path, "question file"):
        where = f"question file {path}:{number}"
        require_keys(record, ("question_id", "text") + (("image",) if needs_image else ()), where)
        text, image = record["text"], record.get("image")
        if not isinstance(text, str):
            raise BenchmarkError(f"{where}: 'text' is not a string")
        if image is not None and (not isinstance(image, str) or not image):
            raise BenchmarkError(f"{where}: 'image' is not a file name: {image!r}")
        if check is not None:
            check(record, where)
        answer_line = {"question_id": record["question_id"], "prompt": text}
        questions.append(question(key_of(answer_line), record["question_id"],
                                  with_suffix(text, suffix), prompt=text, image=image,
                                  category=record.get("category")))
    unique_keys(questions, path)
    return questions
