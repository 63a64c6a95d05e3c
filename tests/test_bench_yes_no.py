"""POPE (per-split accuracy / precision / recall / F1 / yes-ratio) and MME (acc, acc+,
perception / cognition) on small hand-made files, scores worked out by hand."""

from __future__ import annotations

import json

import pytest

from megatron_stgc.eval.benchmarks import get_benchmark
from megatron_stgc.eval.benchmarks.base import BenchmarkError
from megatron_stgc.eval.benchmarks.mme import mme_reading
from megatron_stgc.eval.benchmarks.pope import pope_says_yes

SUFFIX = "\nAnswer the question using a single word or phrase."


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def answer(question_id, text, prompt=None, **metadata):
    line = {"question_id": question_id, "text": text, "metadata": metadata}
    if prompt is not None:
        line["prompt"] = prompt
    return line


@pytest.mark.parametrize("text, yes", [
    ("Yes, there is.", True), ("No.", False), ("There is not a dog.", False), ("yes", True),
    ("Yes. No.", True),       # only the first sentence counts
    ("no, none", False), ("Nope", True),  # "Nope" is none of No / not / no
])
def test_pope_reads_answers_as_the_script_does(text, yes):
    assert pope_says_yes(text) is yes


def pope_dir(tmp_path):
    d = tmp_path / "pope"
    (d / "coco").mkdir(parents=True)
    splits = {"adversarial": ["yes", "yes", "no", "no"], "random": ["yes", "no", "yes", "no"]}
    questions = []
    for split, labels in splits.items():
        rows = []
        for i, label in enumerate(labels):
            image = f"COCO_val2014_{split}_{i}.jpg"
            rows.append({"question_id": i, "image": image, "text": "Is there a dog?",
                         "label": label})
            questions.append({"question_id": f"{split}-{i}", "image": image,
                              "text": "Is there a dog?" + SUFFIX, "category": split})
        write_jsonl(d / "coco" / f"coco_pope_{split}.json", rows)
    write_jsonl(d / "llava_pope_test.jsonl", questions)
    return d


def test_pope_metrics_per_split(tmp_path):
    d = pope_dir(tmp_path)
    bench = get_benchmark("pope")
    files = bench.files(str(d))
    files.answers_file = write_jsonl(tmp_path / "a.jsonl", [
        # adversarial, labels yes yes no no; read as yes no no yes
        answer("adversarial-0", "Yes, there is."), answer("adversarial-1", "No."),
        answer("adversarial-2", "There is not a dog."), answer("adversarial-3", "yes"),
        # random, labels yes no yes no; the 4th is missing: the wrong answer (yes)
        answer("random-0", "Yes"), answer("random-1", "No"), answer("random-2", "Yes")])
    result = bench.evaluate(files)
    adversarial, random_split = result["per_category"]["adversarial"], result["per_category"]["random"]
    # TP 1 (q0), FN 1 (q1), TN 1 (q2), FP 1 (q3): every metric 2/4 or 1/2 = 50%
    assert (adversarial["TP"], adversarial["FN"], adversarial["TN"], adversarial["FP"]) == (1, 1, 1, 1)
    for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        assert adversarial[key] == pytest.approx(50.0)
    # TP 2, TN 1, FP 1 (the missing one), FN 0: accuracy 3/4, precision 2/3, recall 2/2,
    # F1 = 2 * 2/3 * 1 / (2/3 + 1) = 0.8, yes-ratio 3/4
    assert random_split["accuracy"] == pytest.approx(75.0)
    assert random_split["precision"] == pytest.approx(200 / 3)
    assert random_split["recall"] == pytest.approx(100.0)
    assert random_split["f1"] == pytest.approx(80.0)
    assert random_split["yes_ratio"] == pytest.approx(75.0)
    assert result["metrics"]["mean f1"] == pytest.approx((50 + 80) / 2)
    assert result["metrics"]["mean accuracy"] == pytest.approx((50 + 75) / 2)
    assert result["counts"]["missing"] == 1


def test_pope_label_file_of_other_questions_is_an_error(tmp_path):
    d = pope_dir(tmp_path)
    rows = [json.loads(line) for line in (d / "coco" / "coco_pope_random.json").read_text()
            .splitlines()]
    rows[2]["image"] = "COCO_val2014_000000999999.jpg"
    write_jsonl(d / "coco" / "coco_pope_random.json", rows)
    bench = get_benchmark("pope")
    files = bench.files(str(d))
    files.answers_file = write_jsonl(tmp_path / "a.jsonl", [answer("random-0", "yes")])
    with pytest.raises(BenchmarkError, match=r"coco_pope_random.json:3: image "
                                             r"'COCO_val2014_000000999999.jpg'.*random-2"):
        bench.evaluate(files)


@pytest.mark.parametrize("text, reading", [
    ("Yes", "yes"), ("no", "no"), ("No, there is not", "no"), ("Yes, it is", "yes"),
    ("Maybe", "other"), ("Nope", "no"), ("I think yes", "other")])
def test_mme_reads_answers_as_calculation_py(text, reading):
    assert mme_reading(text) == reading


def mme_dir(tmp_path):
    d = tmp_path / "MME"
    root = d / "MME_Benchmark_release_version"
    yn = " Please answer yes or no."
    files = {  # subtask -> (image stem, layout, [(question, answer)])
        "existence": [("0001", [("Is there a dog?" + yn, "Yes"), ("Is there a cat?" + yn, "No")]),
                      ("0002", [("Is there a car?" + yn, "No"), ("Is there a bus?" + yn, "Yes")])],
        "artwork": [("10002", [("Is this a painting?" + yn, "Yes"),
                               ("Is this a sculpture?" + yn, "No")])],
        "code_reasoning": [("0020", [("Will the code print 3?" + yn, "Yes"),
                                     ("Will it print 4?" + yn, "No")])],
    }
    questions = []
    for subtask, images in files.items():
        split = subtask == "artwork"  # images/ + questions_answers_YN/, as MME ships artwork
        qa = root / subtask / ("questions_answers_YN" if split else "")
        pictures = root / subtask / ("images" if split else "")
        qa.mkdir(parents=True, exist_ok=True)
        pictures.mkdir(parents=True, exist_ok=True)
        for stem, pairs in images:
            (pictures / f"{stem}.png").write_bytes(b"png")
            (qa / f"{stem}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in pairs))
            for q, _ in pairs:
                text = q.replace(yn, "") if q.startswith("Will it") else q  # a text without it
                questions.append({"question_id": f"{subtask}/{stem}.png",
                                  "image": f"{subtask}/{'images/' if split else ''}{stem}.png",
                                  "text": text + SUFFIX, "category": subtask})
    write_jsonl(d / "llava_mme.jsonl", questions)
    return d, questions


def test_mme_acc_acc_plus_and_sums(tmp_path):
    d, questions = mme_dir(tmp_path)
    bench = get_benchmark("mme")
    files = bench.files(str(d))
    texts = ["Yes", "No, there is not",   # existence/0001: both right
             "yes", "Yes",                # existence/0002: 1 of 2 (gt No, Yes)
             "Yes", "Maybe",              # artwork: right, other
             "Nope"]                      # code_reasoning: wrong (gt Yes); the last missing
    files.answers_file = write_jsonl(tmp_path / "a.jsonl", [
        answer(q["question_id"], t, prompt=q["text"]) for q, t in zip(questions, texts)])
    result = bench.evaluate(files)
    tasks = result["per_category"]
    # existence: acc 3/4 = 75, acc+ 1 of 2 images = 50 -> 125
    assert tasks["existence"] == pytest.approx({"acc": 75.0, "acc+": 50.0, "score": 125.0})
    # artwork: acc 1/2 = 50, acc+ 0 -> 50; code_reasoning: 0 right -> 0
    assert tasks["artwork"] == pytest.approx({"acc": 50.0, "acc+": 0.0, "score": 50.0})
    assert tasks["code_reasoning"]["score"] == 0.0
    assert result["metrics"]["perception"] == pytest.approx(175.0)
    assert result["metrics"]["perception subtasks"] == "2/10"
    assert result["metrics"]["cognition"] == 0.0
    assert result["counts"]["missing"] == 1
    assert "count" in result["absent_subtasks"]


def test_mme_question_without_ground_truth_is_an_error(tmp_path):
    d, questions = mme_dir(tmp_path)
    questions[0]["text"] = "Is there a unicorn? Please answer yes or no." + SUFFIX
    write_jsonl(d / "llava_mme.jsonl", questions)
    bench = get_benchmark("mme")
    files = bench.files(str(d))
    files.answers_file = write_jsonl(tmp_path / "a.jsonl", [
        answer(questions[0]["question_id"], "yes", prompt=questions[0]["text"])])
    with pytest.raises(BenchmarkError, match="llava_mme.jsonl record 1: no ground truth for "
                                             "'Is there a unicorn"):
        bench.evaluate(files)
