"""Answer normalisation, exact-match scoring per category, answer files, tables."""

from __future__ import annotations

import json

import pytest

from megatron_stgc.eval.scoring import (accuracy_rows, format_table, normalize_answer,
                                        read_jsonl, score, write_answers)


@pytest.mark.parametrize("raw, expected", [
    ("Seven.", "7"),
    ("seven", "7"),
    (" YES! ", "yes"),
    ("No.", "no"),
    ("Ten", "10"),
    ("none", "0"),
    ("3.5", "3.5"),  # decimals survive
    ("1,000", "1000"),  # comma between digits
    ("yes/no", "yes no"),
    ("(8)", "8"),
    ('"no"', "no"),
    ("A cow says moo.", "cow says moo"),  # articles dropped
    ("The answer is yes", "answer is yes"),  # no prefix stripping: strict
    ("I dont know", "i don't know"),  # contraction repaired
    ("5 - 8 = -3.", "5 8 -3"),  # a leading minus sign is kept
    ("Woman has five letters.", "woman has 5 letters"),
    ("line\nbreak\ttab", "line break tab"),
    ("", ""),
    (None, ""),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def ground_truth():
    return [
        {"question_id": "d1", "answer": "7", "category": "digit"},
        {"question_id": "d2", "answer": "3", "category": "digit"},
        {"question_id": "d3", "answer": "0", "category": "digit"},
        {"question_id": "d4", "answer": "9", "category": "digit"},
        {"question_id": "e1", "answer": "yes", "category": "even"},
        {"question_id": "e2", "answer": "no", "category": "even"},
        {"question_id": "t1", "answer": "A pig says oink.", "category": "text"},
        {"question_id": 5, "answer": ["blue", "light blue"], "category": "text"},
    ]


def answer(qid, text, **metadata):
    return {"question_id": qid, "prompt": "q", "text": text, "answer_id": f"a{qid}",
            "model_id": "m", "metadata": metadata}


def test_exact_match_per_category():
    answers = [answer("d1", "Seven."), answer("d2", "3"), answer("d3", "zero"),
               answer("d4", "8"),  # digit: 3 of 4
               answer("e1", "The answer is yes"), answer("e2", "No"),  # even: 1 of 2
               answer("t1", "a pig says oink"), answer("5", "Light blue!")]  # text: 2 of 2
    result = score(answers, ground_truth())
    digit, even, text = (result["per_category"][c] for c in ("digit", "even", "text"))
    assert (digit["correct"], digit["total"], digit["accuracy"]) == (3, 4, 0.75)
    assert (even["correct"], even["total"], even["accuracy"]) == (1, 2, 0.5)
    assert (text["correct"], text["total"], text["accuracy"]) == (2, 2, 1.0)
    overall = result["overall"]
    assert (overall["correct"], overall["total"], overall["missing"]) == (6, 8, 0)
    assert overall["accuracy"] == pytest.approx(6 / 8)
    assert result["num_questions"] == result["num_answers"] == 8
    assert result["missing_ids"] == []


def test_missing_answers_count_as_wrong_and_are_reported():
    answers = [answer("d1", "7"), answer("d2", "3"), answer("e1", "yes")]
    result = score(answers, ground_truth())
    assert result["overall"]["total"] == 8
    assert result["overall"]["correct"] == 3
    assert result["overall"]["missing"] == 5 and result["overall"]["answered"] == 3
    assert result["per_category"]["digit"]["missing"] == 2
    assert result["per_category"]["digit"]["accuracy"] == 0.5
    assert result["per_category"]["text"]["accuracy"] == 0.0
    assert set(result["missing_ids"]) == {"d3", "d4", "e2", "t1", "5"}


def test_generation_errors_are_wrong_and_counted():
    answers = [answer("d1", "7", error="bad_image: x.png"), answer("d2", None)]
    result = score(answers, ground_truth())
    assert result["per_category"]["digit"]["errors"] == 2
    assert result["per_category"]["digit"]["correct"] == 0


def test_unknown_and_duplicate_ids_raise():
    with pytest.raises(ValueError, match="not in the ground truth"):
        score([answer("d1", "7"), answer("nope", "1")], ground_truth())
    with pytest.raises(ValueError, match="duplicate"):
        score([answer("d1", "7"), answer("d1", "7")], ground_truth())
    with pytest.raises(ValueError, match="no questions"):
        score([], [])


def test_files_round_trip(tmp_path):
    answers_path = tmp_path / "out" / "answers.jsonl"
    truth_path = tmp_path / "truth.jsonl"
    truth_path.write_text("".join(json.dumps(r) + "\n" for r in ground_truth()) + "\n")
    assert write_answers(answers_path, [{"question_id": "d1", "text": "7"},
                                        answer("e2", "no")]) == 2
    lines = answers_path.read_text().splitlines()
    first = json.loads(lines[0])
    assert list(first) == ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]
    assert first["metadata"] == {} and first["text"] == "7"
    assert read_jsonl(answers_path)[1] == answer("e2", "no")
    result = score(str(answers_path), str(truth_path))
    assert (result["overall"]["correct"], result["overall"]["missing"]) == (2, 6)
    with pytest.raises(ValueError, match="has no 'text'"):
        write_answers(answers_path, [{"question_id": "d1"}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_jsonl(bad)


def test_format_table_contains_the_numbers():
    results = {"baseline": score([answer("d1", "7"), answer("d2", "1")], ground_truth()),
               "stgc": score([answer(q["question_id"], q["answer"]) for q in ground_truth()
                              if isinstance(q["answer"], str)] + [answer(5, "blue")],
                             ground_truth())}
    rows = accuracy_rows(results)
    rows += [("final loss", {"baseline": 1.23456, "stgc": 0.98765}),
             ("layer_1 image tokens/expert",
              {"baseline": [10, 20, 30, 40], "stgc": [25, 25, 25, 25]}),
             ("conflict fraction", {"stgc": 0.25})]
    text = format_table(rows, ["baseline", "stgc"], label_header="metric")
    lines = text.splitlines()
    assert lines[0].split() == ["metric", "baseline", "stgc"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    digit_line = next(line for line in lines if line.startswith("accuracy digit"))
    assert digit_line.split()[-2:] == ["25.0%", "100.0%"]
    assert "12.5%" in text and "1.2346" in text and "0.9877" in text
    conflict = next(line for line in lines if line.startswith("conflict fraction"))
    assert conflict.split()[-2:] == ["n/a", "0.2500"]
    assert "10 20 30 40" in text and "25 25 25 25" in text
    # all value columns are aligned: every line has the same length up to trailing blanks
    assert len({len(line) for line in lines}) == 1
    # the {run: {label: value}} form gives the same table (rows in first-appearance order)
    by_run = {run: {label: values.get(run) for label, values in rows if run in values}
              for run in ("baseline", "stgc")}
    assert format_table(by_run, label_header="metric") == text
