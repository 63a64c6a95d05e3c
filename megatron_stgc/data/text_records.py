"""Question/answer records of the text-only ``--data-path`` files, bad records counted by kind.

Each record is ``{"question": ..., "answer": ...}``, ``{"prompt": ..., "response": ...}`` or
LLaVA style ``{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value":
...}, ...]}`` (every human/gpt turn pair is a sample), in a JSON list or JSONL. Records are
found with the LLaVA index's span scanners (``llava_index.jsonl_spans`` /
``json_list_spans``), so one broken record costs only itself: it is counted by kind, like
the LLaVA loader's, with its file and position (or id) as the example, never raised on
and never dropped silently. The trainer prints the counts before step 1 and stops when
they exceed ``--max-bad-sample-fraction`` (data/data_errors.py).
"""

from __future__ import annotations

import json
import os
from typing import Optional

from megatron_stgc.data.data_errors import DataError
from megatron_stgc.data.instruct_text import Conversation
from megatron_stgc.data.llava_index import (BAD_TURN, EMPTY_CONVERSATIONS, MALFORMED_JSON,
                                            NON_UTF8, BadSampleCounter, is_jsonl, is_turn,
                                            json_list_spans, jsonl_spans, record_label)
from megatron_stgc.data.record_checks import text_problem

NO_QUESTION_ANSWER = "no_question_answer"  # none of question/answer, prompt/response, conversations
BAD_FIELD = "bad_field"  # question/answer (prompt/response) missing or not a string


class TextRecords:
    """The conversations of one or more files and the bad records among them."""

    def __init__(self):
        self.conversations: list[Conversation] = []
        self.bad = BadSampleCounter()
        self.num_records = 0

    def read(self, path: str) -> None:
        """Add ``path``'s records; DataError only when the file's structure is unreadable."""
        with open(path, "rb") as f:
            data = f.read()
        try:
            spans = jsonl_spans(data) if is_jsonl(data) else json_list_spans(data)
        except ValueError as error:
            raise DataError(f"--data-path {path}: not a JSON list or JSONL file ({error})") from None
        for number, (offset, length) in enumerate(spans.tolist()):
            self.num_records += 1
            found, kind, label = parse_record(data[offset:offset + length], number)
            if kind is None:
                self.conversations.extend(found)
            else:
                self.bad.add(kind, f"{os.path.basename(path)}:{label}")


def parse_record(raw: bytes, number: int) -> tuple[list[Conversation], Optional[str], str]:
    """(conversations, bad kind or None, label) of one record's bytes."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return [], NON_UTF8, f"#{number}"
    except (ValueError, RecursionError):
        return [], MALFORMED_JSON, f"#{number}"
    label = record_label(record, number)
    if not isinstance(record, dict):
        return [], MALFORMED_JSON, label
    problem = text_problem(record)
    if problem is not None:
        return [], problem, label
    if "conversations" in record:
        return _turn_pairs(record["conversations"], label)
    for question_key, answer_key in (("question", "answer"), ("prompt", "response")):
        if question_key in record:
            question, answer = record[question_key], record.get(answer_key)
            if not isinstance(question, str) or not isinstance(answer, str):
                return [], BAD_FIELD, label
            return [Conversation(question, answer)], None, label
    return [], NO_QUESTION_ANSWER, label


def _turn_pairs(turns: object, label: str) -> tuple[list[Conversation], Optional[str], str]:
    if not isinstance(turns, list) or not all(is_turn(turn) for turn in turns):
        return [], BAD_TURN, label
    pairs = [Conversation(human["value"], gpt["value"])
             for human, gpt in zip(turns[0::2], turns[1::2])]
    return (pairs, None, label) if pairs else ([], EMPTY_CONVERSATIONS, label)


def read_text_records(paths: list[str]) -> TextRecords:
    """All files' records; DataError when none gives a conversation."""
    records = TextRecords()
    for path in paths:
        records.read(path)
    if not records.conversations:
        raise DataError(f"--data-path {', '.join(paths)}: no usable conversations among "
                        f"{records.num_records} records\n{records.bad.report()}")
    return records
