"""VQA answer normalisation, the 10-annotator soft accuracy, and the VQAv2 / VizWiz / TextVQA
readers, scorers and submission files on small hand-made files (scores worked out by hand)."""

from __future__ import annotations

import json

import pytest

from megatron_stgc.eval.benchmarks import get_benchmark
from megatron_stgc.eval.benchmarks.vqa_metric import normalize, soft_accuracy
from megatron_stgc.eval.benchmarks.vqa import textvqa_question


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def answer_line(question_id, text, prompt=None, **metadata):
    line = {"question_id": question_id, "text": text, "answer_id": "x", "model_id": "m",
            "metadata": metadata}
    if prompt is not None:
        line["prompt"] = prompt
    return line


@pytest.mark.parametrize("raw, expected", [
    ("Yes.", "yes"),                 # lowercase, final period deleted
    ("Two", "2"),                    # number word
    ("the red car", "red car"),      # article dropped
    ("dont know", "don't know"),     # contraction repaired
    ("yes/no", "yes no"),            # "/" touches no space: becomes a space
    ("left-hand side -", "lefthand side"),  # "-" touches a space somewhere: every "-" deleted
    ("hot-dog", "hot dog"),
    ("3.5", "3.5"),                  # a period before a digit stays
    ("1,000", "1000"),               # every comma deleted first
    ("What's that?", "what 's that"),  # "?" deleted, "'s" split off
    ("(7)", "7"),
    ("u.s.a.", "usa"),
    ("x-ray, please", "x ray please"),
    ("somebody'd", "somebodyd"),     # the evaluator's own table entry
    ("line\nbreak\ttab", "line break tab"),
])
def test_normalize_follows_the_official_processor(raw, expected):
    assert normalize(raw) == expected


def test_at_most_32_periods_are_removed():
    # 33 periods not followed by a digit: the evaluator's re.sub count (re.UNICODE == 32)
    # leaves the last one
    assert normalize("a" + ".b" * 33) == "a" + "b" * 32 + ".b"


def test_soft_accuracy_is_the_leave_one_out_average():
    # 2 "yes", 8 "no". Predict "yes": leaving out a "yes" (2 ways) leaves 1 match -> 1/3;
    # leaving out a "no" (8 ways) leaves 2 matches -> 2/3; (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    refs = ["yes"] * 2 + ["no"] * 8
    assert soft_accuracy("Yes", refs) == pytest.approx(0.6)
    # predict "no": at least 7 matches remain whichever is left out -> 1 each -> 1.0
    assert soft_accuracy("no.", refs) == pytest.approx(1.0)
    # 3 "cat", 7 "dog": predict "cat": leaving a cat out (3 ways) leaves 2 -> 2/3, a dog out
    # (7 ways) leaves 3 -> 1; (3 * 2/3 + 7) / 10 = 0.9
    assert soft_accuracy("A cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(0.9)
    assert soft_accuracy("bird", ["cat"] * 3 + ["dog"] * 7) == 0.0
    # the references are normalised too: "Two" and "2" are the same answer
    assert soft_accuracy("2", ["Two"] * 4 + ["3"] * 6) == pytest.approx(1.0)


def vqav2_dir(tmp_path):
    d = tmp_path / "vqav2"
    d.mkdir()
    (d / "test2015").mkdir()
    suffix = "\nAnswer the question using a single word or phrase."
    write_jsonl(d / "llava_vqav2_mscoco_test-dev2015.jsonl", [
        {"question_id": 11, "image": "a.jpg", "text": "How many?" + suffix, "category": "default"},
        {"question_id": 12, "image": "b.jpg", "text": "Is it red?" + suffix, "category": "default"},
    ])
    write_jsonl(d / "llava_vqav2_mscoco_test2015.jsonl", [
        {"question_id": q, "image": "x.jpg", "text": "?"} for q in (11, 12, 13)])
    return d


def test_vqav2_test_dev_writes_the_submission_over_the_whole_test_set(tmp_path):
    d = vqav2_dir(tmp_path)
    bench = get_benchmark("vqav2")
    files = bench.files(str(d), model_id="run1")
    questions = bench.read_questions(files)
    # the files carry the suffix already: it is not added twice
    assert questions[0]["text"].count("single word") == 1
    write_jsonl(tmp_path / "answers.jsonl", [answer_line(11, "Two."), answer_line(12, "Yes")])
    files.answers_file = str(tmp_path / "answers.jsonl")
    result = bench.evaluate(files)
    assert result["metrics"] == {} and result["counts"]["answered"] == 2
    assert result["submission_file"] == str(d / "answers_upload" / "run1.json")
    rows = json.loads((d / "answers_upload" / "run1.json").read_text())
    # every test2015 id, normalised answers, "" for the question not asked (13)
    assert rows == [{"question_id": 11, "answer": "2"}, {"question_id": 12, "answer": "yes"},
                    {"question_id": 13, "answer": ""}]


def test_vqav2_val_split_is_scored_per_answer_type(tmp_path):
    d = vqav2_dir(tmp_path)
    annotations = {"annotations": [
        {"question_id": 11, "answer_type": "number",
         "answers": [{"answer": "2"}] * 3 + [{"answer": "3"}] * 7},
        {"question_id": 12, "answer_type": "yes/no", "answers": [{"answer": "yes"}] * 10}]}
    (tmp_path / "ann.json").write_text(json.dumps(annotations))
    bench = get_benchmark("vqav2")
    files = bench.files(str(d), annotations=str(tmp_path / "ann.json"))
    files.answers_file = write_jsonl(tmp_path / "a.jsonl",
                                     [answer_line(11, "two"), answer_line(12, "no")])
    result = bench.evaluate(files)
    # q11: "2" given by 3 of 10 -> (3 * 2/3 + 7 * 1) / 10 = 0.9; q12: "no" by none -> 0
    assert result["metrics"]["accuracy"] == pytest.approx(100 * (0.9 + 0) / 2)
    assert result["per_category"]["number"]["accuracy"] == pytest.approx(90.0)
    assert result["per_category"]["yes/no"]["accuracy"] == 0.0


def test_vizwiz_submission_and_val_scoring(tmp_path):
    d = tmp_path / "vizwiz"
    d.mkdir()
    write_jsonl(d / "llava_test.jsonl", [
        {"question_id": 0, "image": "VizWiz_test_0.jpg", "text": "What is this?"},
        {"question_id": 1, "image": "VizWiz_test_1.jpg", "text": "What color?"}])
    bench = get_benchmark("vizwiz")
    files = bench.files(str(d), model_id="m")
    questions = bench.read_questions(files)
    # a file without the suffix gets LLaVA's VizWiz suffix
    assert questions[0]["text"].endswith("respond with 'Unanswerable'.\nAnswer the question "
                                         "using a single word or phrase.")
    assert questions[0]["prompt"] == "What is this?"  # the answer line keeps the file's text
    files.answers_file = write_jsonl(tmp_path / "a.jsonl", [
        answer_line(0, "Unanswerable"), answer_line(1, "", error="missing_image: /x.jpg")])
    result = bench.evaluate(files)
    rows = json.loads(open(result["submission_file"]).read())
    assert rows == [{"image": "VizWiz_test_0.jpg", "answer": "unanswerable"},
                    {"image": "VizWiz_test_1.jpg", "answer": ""}]
    assert result["counts"]["missing_images"] == 1 and result["counts"]["errors"] == 1
    (tmp_path / "val.json").write_text(json.dumps([
        {"image": "VizWiz_test_0.jpg", "answer_type": "unanswerable",
         "answers": [{"answer": "unanswerable"}] * 10},
        {"image": "VizWiz_test_1.jpg", "answer_type": "other",
         "answers": [{"answer": "blue"}] * 10}]))
    files.annotations = str(tmp_path / "val.json")
    scored = bench.evaluate(files)
    # q0 right (1.0), q1 failed (0): 50%
    assert scored["metrics"]["accuracy"] == pytest.approx(50.0)


def test_textvqa_matches_by_image_and_question(tmp_path):
    d = tmp_path / "textvqa"
    d.mkdir()
    suffix = "\nAnswer the question using a single word or phrase."
    questions = [
        {"question_id": "img1", "image": "img1.jpg",
         "text": "what brand is this?\nReference OCR token: NOKIA" + suffix},
        {"question_id": "img1", "image": "img1.jpg", "text": "what color is the logo?" + suffix},
        {"question_id": "img2", "image": "img2.jpg", "text": "what number?" + suffix}]
    write_jsonl(d / "llava_textvqa_val_v051_ocr.jsonl", questions)
    (d / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": [
        {"image_id": "img1", "question": "What brand is this?", "answers": ["nokia"] * 10},
        {"image_id": "img1", "question": "What color is the logo?",
         "answers": ["red"] * 3 + ["blue"] * 7},
        {"image_id": "img2", "question": "What number?", "answers": ["5"] * 10}]}))
    bench = get_benchmark("textvqa")
    files = bench.files(str(d))
    files.answers_file = write_jsonl(tmp_path / "a.jsonl", [
        answer_line("img1", "Nokia.", prompt=questions[0]["text"]),
        answer_line("img1", "red", prompt=questions[1]["text"])])  # img2 not answered
    result = bench.evaluate(files)
    # 1.0 + (3 * 2/3 + 7) / 10 = 0.9 + 0 (missing) over 3 questions
    assert result["metrics"]["accuracy"] == pytest.approx(100 * (1.0 + 0.9 + 0.0) / 3)
    assert result["counts"]["missing"] == 1 and result["counts"]["missing_ids"] == ["img2"]
    assert textvqa_question(questions[0]["text"]) == "what brand is this?"
