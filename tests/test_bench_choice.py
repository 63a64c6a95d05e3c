"""ScienceQA option letters, MMBench option extraction with circular evaluation and its
submission TSV, GQA exact match: small hand-made files, scores worked out by hand."""

from __future__ import annotations

import base64
import csv
import io
import json

import pytest

from megatron_stgc.eval.benchmarks import get_benchmark
from megatron_stgc.eval.benchmarks.mmbench import extract_option
from megatron_stgc.eval.benchmarks.sqa import sqa_letter

LETTER = "Answer with the option's letter from the given choices directly."


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def answer(question_id, text, **more):
    return {"question_id": question_id, "text": text, "metadata": {}, **more}


# ------------------------------------------------------------------ ScienceQA

@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("D. five", "D"), ("The answer is A.", "A"), ("E", "E"),
    ("The answer is A. The answer is B.", "FAILED"),  # two "The answer is": no letter
    ("b", "FAILED"), ("Bees", "FAILED")])
def test_sqa_letter(text, letter):
    assert sqa_letter(text) == letter


def sqa_dir(tmp_path):
    d = tmp_path / "scienceqa"
    d.mkdir()
    problems = {"p1": {"choices": ["x", "y", "z"], "answer": 1, "image": "image.png"},
                "p2": {"choices": ["x", "y"], "answer": 0, "image": "image.png"},
                "p3": {"choices": ["1", "2", "3", "4"], "answer": 3, "image": None},
                "p4": {"choices": ["x", "y"], "answer": 1, "image": "image.png"}}
    (d / "problems.json").write_text(json.dumps(problems))
    (d / "pid_splits.json").write_text(json.dumps({"test": ["p1", "p2", "p3", "p4"]}))
    records = [{"id": pid, "conversations": [
        {"from": "human", "value": ("<image>\n" if p["image"] else "")
         + f"Context: none\nQuestion: {pid}?\nOptions: (A) x (B) y"},
        {"from": "gpt", "value": "A"}]} for pid, p in problems.items()]
    for record, p in zip(records, problems.values()):
        if p["image"]:
            record["image"] = f"{record['id']}/image.png"
    (d / "llava_test_CQM-A.json").write_text(json.dumps(records))
    return d


def test_sqa_questions_carry_the_letter_prompt_and_the_image_tag_in_the_prompt(tmp_path):
    bench = get_benchmark("sqa-img")
    questions = bench.read_questions(bench.files(str(sqa_dir(tmp_path))))
    first = questions[0]
    assert first["text"] == f"Context: none\nQuestion: p1?\nOptions: (A) x (B) y\n{LETTER}"
    assert first["prompt"] == "<image>\n" + first["text"]
    assert first["image"] == "p1/image.png" and questions[2]["image"] is None


def test_sqa_img_accuracy(tmp_path):
    d = sqa_dir(tmp_path)
    bench = get_benchmark("sqa-img")
    files = bench.files(str(d))
    files.answers_file = write_jsonl(tmp_path / "a.jsonl", [
        answer("p1", "B"),                  # right (answer 1 = B)
        answer("p2", "The answer is A."),   # right
        answer("p3", "D. 4"),               # right (no image)
        answer("p4", "C")])                 # C is not among p4's two choices: wrong
    result = bench.evaluate(files)
    # all: 3 / 4; with an image (p1, p2, p4): 2 / 3
    assert result["metrics"]["accuracy"] == pytest.approx(75.0)
    assert result["metrics"]["img accuracy"] == pytest.approx(200 / 3)
    assert result["metrics"]["img problems"] == 3


# ------------------------------------------------------------------ MMBench

PNG = b"\x89PNG\r\n\x1a\n" + bytes(64)


def mmbench_tsv(path, answers=("B", "A")):
    rows = [["index", "question", "hint", "A", "B", "C", "D", "answer", "category",
             "l2-category", "source", "image", "comment"],
            ["0", "What is shown?", "nan", "cat", "dog", "bird", "", answers[0], "coarse", "l2",
             "s", base64.b64encode(PNG).decode(), "nan"],
            ["1", "Which color?", "Look closely.", "red", "blue", "", "", answers[1], "fine", "l2",
             "s", base64.b64encode(PNG).decode(), "nan"]]
    buffer = io.StringIO()
    csv.writer(buffer, delimiter="\t").writerows(rows)
    path.write_text(buffer.getvalue())
    return str(path)


@pytest.mark.parametrize("text, options, letter", [
    ("B", {"A": "cat", "B": "dog"}, "B"),
    ("A. dog", {"A": "dog", "B": "cat"}, "A"),
    ("(C)", {"A": "x", "B": "y", "C": "z"}, "C"),
    ("The answer is dog", {"A": "bird", "B": "cat", "C": "dog"}, "C"),  # by the option's text
    ("B or C", {"A": "x", "B": "y", "C": "z"}, None),  # two letters, no option text
    ("a cat or a dog", {"A": "cat", "B": "dog"}, None)])
def test_mmbench_option_extraction(text, options, letter):
    assert extract_option(text, options) == letter


def test_mmbench_circular_evaluation_and_submission(tmp_path):
    d = tmp_path / "mmbench"
    d.mkdir()
    mmbench_tsv(d / "mmbench_dev_20230712.tsv")
    bench = get_benchmark("mmbench")
    files = bench.files(str(d), model_id="m")
    questions = bench.read_questions(files)
    # row 0 has 3 options -> 3 rounds, row 1 has 2 -> 2 rounds, options rotated by one
    assert [(q["question_id"], q["extra"]["round_id"]) for q in questions] == [
        (0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    assert questions[1]["extra"]["options"] == ["dog", "bird", "cat"]
    assert questions[1]["extra"]["option_char"] == ["B", "C", "A"]
    assert questions[3]["prompt"] == "Look closely.\nWhich color?\nA. red\nB. blue"
    assert questions[3]["text"] == questions[3]["prompt"] + "\n" + LETTER
    bench.prepare_images(questions, files)
    assert (d / "images_mmbench_dev_20230712" / questions[0]["image"]).read_bytes() == PNG
    assert questions[0]["image"] == "0.png"
    files.answers_file = write_jsonl(tmp_path / "a.jsonl", [
        answer(q["question_id"], text, round_id=q["extra"]["round_id"])
        for q, text in zip(questions, [
            "B",                  # row 0 round 0: B = dog, right
            "A. dog",             # round 1 shows dog as A: right
            "The answer is dog",  # round 2 shows dog as C (by text): right
            "A",                  # row 1 round 0: A = red, right
            "A"])])               # round 1 shows blue as A: wrong
    result = bench.evaluate(files)
    # row 0 right in every round, row 1 not: circular 1/2; round 0 alone: 2/2
    assert result["metrics"]["circular accuracy"] == pytest.approx(50.0)
    assert result["metrics"]["single-round accuracy"] == pytest.approx(100.0)
    assert result["per_category"]["coarse"]["circular accuracy"] == 100.0
    assert result["per_category"]["fine"]["circular accuracy"] == 0.0
    with open(result["submission_file"], newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["index", "question", "A", "B", "C", "D", "prediction", "answer"]
    assert [row[6] for row in rows[1:]] == ["B", "A"]  # round 0's answers


def test_mmbench_test_split_without_answers_is_not_scored(tmp_path):
    d = tmp_path / "mmbench"
    d.mkdir()
    mmbench_tsv(d / "mmbench_test.tsv", answers=("", ""))
    bench = get_benchmark("mmbench")
    files = bench.files(str(d), question_file=str(d / "mmbench_test.tsv"), model_id="m")
    questions = bench.read_questions(files)
    files.answers_file = write_jsonl(tmp_path / "a.jsonl", [
        answer(q["question_id"], "A", round_id=q["extra"]["round_id"]) for q in questions])
    result = bench.evaluate(files)
    assert result["metrics"] == {} and result["submission_file"].endswith("m.tsv")


# ------------------------------------------------------------------ GQA

def test_gqa_exact_match_on_balanced_questions(tmp_path):
    d = tmp_path / "gqa"
    (d / "data" / "questions1.2").mkdir(parents=True)
    write_jsonl(d / "llava_gqa_testdev_balanced.jsonl", [
        {"question_id": q, "image": f"{q}.jpg", "text": "?"} for q in ("q1", "q2", "q3")])
    (d / "data" / "questions1.2" / "testdev_balanced_questions.json").write_text(json.dumps({
        "q1": {"answer": "yes", "isBalanced": True, "types": {"structural": "verify"}},
        "q2": {"answer": "table", "isBalanced": True, "types": {"structural": "query"}},
        "q3": {"answer": "left", "isBalanced": False, "types": {"structural": "query"}}}))
    bench = get_benchmark("gqa")
    files = bench.files(str(d))
    files.answers_file = write_jsonl(tmp_path / "a.jsonl", [
        answer("q1", "Yes."),       # "yes": right (binary)
        answer("q2", "The table"),  # "the table" != "table": wrong (open)
        answer("q3", "right")])     # not balanced: not counted
    result = bench.evaluate(files)
    assert result["metrics"]["accuracy"] == pytest.approx(50.0)
    assert result["metrics"]["binary"] == 100.0 and result["metrics"]["open"] == 0.0
    predictions = json.loads(open(result["submission_file"]).read())
    assert predictions[:2] == [{"questionId": "q1", "prediction": "yes"},
                               {"questionId": "q2", "prediction": "the table"}]
