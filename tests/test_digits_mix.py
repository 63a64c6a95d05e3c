"""The digits instruction mix: real sklearn digit images, conflicting question types."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from megatron_stgc.data.digits import QUESTION_PHRASINGS, build_digits_mix
from megatron_stgc.data.llava_index import LlavaIndex

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TYPES = ("digit", "even", "greater_than_four", "plus_one")


def expected_answer(question_type: str, label: int) -> str:
    return {"digit": str(label), "even": ["no", "yes"][label % 2 == 0],
            "greater_than_four": ["no", "yes"][label > 4],
            "plus_one": str(label + 1)}[question_type]


def image_index(path: str) -> int:
    assert path.startswith("images/digit_") and path.endswith(".png")
    return int(path[len("images/digit_"):-len(".png")])


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def sklearn_digits():
    digits = load_digits()
    return digits.images, digits.target


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    return build_digits_mix(str(tmp_path_factory.mktemp("mix") / "data"), seed=5)


@pytest.fixture(scope="module")
def train(mix):
    with open(mix["train"]) as f:
        return json.load(f)


def category_of(record: dict) -> str:
    return "text" if "image" not in record else record["id"].split("_", 2)[2]


def test_counts_per_type(mix, train):
    counts = mix["counts"]
    assert counts["images"] == 1797
    assert counts["train_images"] + counts["val_images"] == 1797
    assert abs(counts["val_images"] - 0.2 * 1797) <= 10
    n_train, n_val = counts["train_images"], counts["val_images"]
    actual = {t: 0 for t in TYPES + ("text",)}
    for record in train:
        actual[category_of(record)] += 1
    assert actual == counts["train_by_category"]
    assert all(actual[t] == n_train for t in TYPES)  # every train image x every type
    assert len(train) == counts["train_records"] == 4 * n_train + actual["text"]
    assert abs(actual["text"] / len(train) - 0.2) < 0.01
    answers = read_jsonl(mix["val_answers"])
    val_counts = {t: sum(a["category"] == t for a in answers) for t in TYPES + ("text",)}
    assert val_counts == counts["val_by_category"]
    assert all(val_counts[t] == n_val for t in TYPES) and val_counts["text"] > 0
    assert len(answers) == counts["val_questions"]
    assert sorted(os.listdir(mix["images_dir"])) == [f"digit_{i:04d}.png" for i in range(1797)]


def test_split_is_by_image_and_disjoint(mix, train, sklearn_digits):
    _, labels = sklearn_digits
    train_images = {r["image"] for r in train if "image" in r}
    val_images = {q["image"] for q in read_jsonl(mix["val_questions"]) if "image" in q}
    assert not train_images & val_images
    assert len(train_images) == mix["counts"]["train_images"]
    assert len(val_images) == mix["counts"]["val_images"]
    assert len(train_images | val_images) == 1797
    val_labels = np.bincount(labels[[image_index(p) for p in val_images]], minlength=10)
    assert np.all(np.abs(val_labels - 0.2 * np.bincount(labels)) <= 1)  # stratified


def test_pngs_are_the_sklearn_pixels(mix, sklearn_digits):
    images, _ = sklearn_digits
    for index in range(len(images)):
        with Image.open(os.path.join(mix["image_root"], f"images/digit_{index:04d}.png")) as img:
            assert img.mode == "L" and img.size == (8, 8)
            pixels = np.asarray(img)
        expected = np.rint(images[index] * 255.0 / 16.0).astype(np.uint8)
        np.testing.assert_array_equal(pixels, expected)
    assert images.max() == 16  # so 255 is reached


def test_answers_match_the_sklearn_labels(mix, train, sklearn_digits):
    _, labels = sklearn_digits
    for record in train:
        human, gpt = record["conversations"]
        assert (human["from"], gpt["from"]) == ("human", "gpt")
        if "image" not in record:
            continue
        question_type = category_of(record)
        assert human["value"].startswith("<image>\n")
        assert human["value"].count("<image>") == 1
        assert human["value"][len("<image>\n"):] in QUESTION_PHRASINGS[question_type]
        label = int(labels[image_index(record["image"])])
        assert gpt["value"] == expected_answer(question_type, label)
    questions = {q["question_id"]: q for q in read_jsonl(mix["val_questions"])}
    answers = read_jsonl(mix["val_answers"])
    assert list(questions) == [a["question_id"] for a in answers]
    for answer in answers:
        question = questions[answer["question_id"]]
        assert question["category"] == answer["category"]
        assert "<image>" not in question["text"]
        if answer["category"] != "text":
            label = int(labels[image_index(question["image"])])
            assert question["text"] in QUESTION_PHRASINGS[answer["category"]]
            assert answer["answer"] == expected_answer(answer["category"], label)
    # both "yes" and "no" occur, and one image gets conflicting answers across types
    assert {a["answer"] for a in answers if a["category"] == "even"} == {"yes", "no"}
    by_image = {}
    for answer in answers:
        if answer["category"] != "text":
            image = questions[answer["question_id"]]["image"]
            by_image.setdefault(image, set()).add(answer["answer"])
    assert all(len(a) >= 2 for a in by_image.values())


def test_text_only_records_have_no_image(mix, train):
    text = [r for r in train if "image" not in r]
    assert text and all("<image>" not in t["value"] for r in text for t in r["conversations"])
    val_text = [q for q in read_jsonl(mix["val_questions"]) if q["category"] == "text"]
    assert val_text and all("image" not in q for q in val_text)


def test_val_json_matches_the_question_files(mix):
    with open(mix["val"]) as f:
        val = json.load(f)
    answers = read_jsonl(mix["val_answers"])
    questions = read_jsonl(mix["val_questions"])
    assert [r["id"] for r in val] == [a["question_id"] for a in answers]
    for record, question, answer in zip(val, questions, answers):
        assert record.get("image") == question.get("image")
        human = record["conversations"][0]["value"]
        assert human == ("<image>\n" if "image" in question else "") + question["text"]
        assert record["conversations"][1]["value"] == answer["answer"]


def test_llava_index_accepts_every_record(mix, tmp_path):
    for name in ("train", "val"):
        with LlavaIndex(mix[name], image_root=mix["image_root"], cache_dir=str(tmp_path)) as index:
            assert index.bad_samples.total == 0
            assert len(index) == index.num_records > 0


def test_deterministic_idempotent_and_rebuilt_on_new_parameters(mix, tmp_path):
    other = build_digits_mix(str(tmp_path / "again"), seed=5)
    assert not other["reused"] and other["counts"] == mix["counts"]
    for key in ("train", "val", "val_questions", "val_answers", "manifest"):
        with open(mix[key], "rb") as a, open(other[key], "rb") as b:
            assert a.read() == b.read(), key
    for index in range(0, 1797, 97):
        name = f"digit_{index:04d}.png"
        with open(os.path.join(mix["images_dir"], name), "rb") as a, \
                open(os.path.join(other["images_dir"], name), "rb") as b:
            assert a.read() == b.read()

    mtime = os.path.getmtime(other["manifest"])
    again = build_digits_mix(str(tmp_path / "again"), seed=5)
    assert again["reused"] and again["counts"] == other["counts"]
    assert os.path.getmtime(other["manifest"]) == mtime

    changed = build_digits_mix(str(tmp_path / "again"), seed=6, questions_per_image=2)
    assert not changed["reused"]
    assert changed["counts"]["train_images"] == mix["counts"]["train_images"]
    n_image_records = sum(v for k, v in changed["counts"]["train_by_category"].items()
                          if k != "text")
    assert n_image_records == 2 * changed["counts"]["train_images"]
    with open(changed["train"]) as a, open(mix["train"]) as b:
        assert a.read() != b.read()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temp dirs left


def test_refuses_foreign_directory_and_bad_parameters(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing"):
        build_digits_mix(str(foreign))
    assert (foreign / "keep.txt").read_text() == "mine"
    for bad in ({"val_fraction": 0.0}, {"text_only_fraction": 1.0}, {"questions_per_image": 5}):
        with pytest.raises(ValueError):
            build_digits_mix(str(tmp_path / "x"), **bad)


def test_cli_reports_counts(mix, capsys):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import make_digits_mix
    finally:
        sys.path.remove(os.path.join(REPO, "tools"))
    assert make_digits_mix.main(["--output", mix["output_dir"], "--seed", "5"]) == 0
    out = capsys.readouterr().out
    assert "reused" in out and str(mix["counts"]["train_records"]) in out
    assert "greater_than_four" in out and str(mix["counts"]["val_images"]) in out


def test_question_first_puts_the_image_after_the_question(mix, train, tmp_path):
    """--question-first (issue 22): the same records with the <image> tag after the question,
    in train.json and val_questions.jsonl; tokenized, every image id comes after the
    question's ids (so causal attention lets image tokens see the question)."""
    from megatron_stgc.data.conversation import prompt_tokens, tokenize_conversation
    from megatron_stgc.data.tokenizer import Tokenizer, train_tokenizer

    first = build_digits_mix(str(tmp_path / "qfirst"), seed=5, question_first=True)
    assert first["parameters"]["question_first"] and not mix["parameters"]["question_first"]
    with open(first["train"]) as f:
        records = json.load(f)
    assert [r["id"] for r in records] == [r["id"] for r in train]
    for ours, default in zip(records, train):
        human, plain = ours["conversations"][0]["value"], default["conversations"][0]["value"]
        if "image" in ours:
            question = plain[len("<image>\n"):]
            assert plain == f"<image>\n{question}"
            assert human == f"{question}\n<image>"
        else:
            assert human == plain
    questions = read_jsonl(first["val_questions"])
    assert all(q["text"].endswith("\n<image>") == ("image" in q) for q in questions)

    model = str(tmp_path / "spm.model")
    train_tokenizer([r["conversations"][0]["value"].replace("<image>", "") + " "
                     + r["conversations"][1]["value"] for r in records[:500]], 128, model)
    tokenizer = Tokenizer(model)
    image_id, count = 10_000, 4
    with open(first["val"]) as f:
        record = next(r for r in json.load(f) if "image" in r)  # a validation question
    question = record["conversations"][0]["value"][:-len("\n<image>")]
    ids = tokenize_conversation(record["conversations"], tokenizer, has_image=True,
                                image_token_id=image_id, num_image_tokens=count,
                                max_length=200).tokens.tolist()
    image_at = [i for i, t in enumerate(ids) if t == image_id]
    assert len(image_at) == count and image_at == list(range(image_at[0], image_at[0] + count))
    before, after = tokenizer.decode(ids[:image_at[0]]), tokenizer.decode(ids[image_at[-1] + 1:])
    assert before.rstrip().endswith(question)  # the whole question before the image ...
    assert question.split()[-1] not in after  # ... and none of it after
    line = next(q for q in questions if q["question_id"] == record["id"])
    prompt = prompt_tokens(line["text"], tokenizer, has_image=True, image_token_id=image_id,
                           num_image_tokens=count)
    assert prompt[:image_at[0] + count] == ids[:image_at[0] + count]  # eval sees the same
