"""No run silently loses its images (issue 20): the three ways a vision-language run used to
become a text-only run without an error now each end with a clear one, and a run whose
records turn out unusable stops instead of training on what is left.

1. --image-root omitted                -> ConfigError (--image-root . is allowed);
2. an existing but wrong --image-root   -> DataError before step 1 (every image is missing);
3. --seq-length shorter than the image  -> ConfigError naming the image tokens;
plus: a mix without any image record for a vision model, --max-bad-sample-fraction at index
time and in use (the training loop's check on log steps, end to end), and the text-only
loader counting bad records by kind instead of raising on the first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from megatron_stgc.config import ConfigError, parse_run_config
from megatron_stgc.validation import validate_run_config
from megatron_stgc.data.data_errors import (MIN_BAD_IN_USE, DataError, check_in_use_health,
                                            check_index_health, check_text_health)
from megatron_stgc.data.images import CLIP_MEAN, CLIP_STD, ImagePreprocessor
from megatron_stgc.data.llava_dataset import build_llava_dataset
from megatron_stgc.data.llava_mix import open_llava_mix
from megatron_stgc.data.text_records import BAD_FIELD, NO_QUESTION_ANSWER, read_text_records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "examples", "tiny_llava_digits.yaml")


def _write_mix(root, n_image: int = 30, n_text: int = 10, corrupt: int = 0,
               question_words: int = 1) -> str:
    """n_image records with an 8x8 PNG (the first ``corrupt`` of them not decodable) and
    n_text text-only records; the image tag after ``question_words`` words."""
    os.makedirs(root / "img", exist_ok=True)
    records = []
    for i in range(n_image):
        name = root / "img" / f"{i}.png"
        if i < corrupt:
            name.write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
        else:
            Image.fromarray(np.full((8, 8), 7 * i % 256, dtype=np.uint8)).save(name)
        question = " ".join(["word"] * question_words) + " <image> which shade?"
        records.append({"id": f"img{i}", "image": f"img/{i}.png", "conversations": [
            {"from": "human", "value": question}, {"from": "gpt", "value": f"shade {i % 4}"}]})
    for i in range(n_text):
        records.append({"id": f"txt{i}", "conversations": [
            {"from": "human", "value": f"What is {i} plus one?"},
            {"from": "gpt", "value": str(i + 1)}]})
    path = root / "mix.json"
    path.write_text(json.dumps(records))
    return str(path)


def _vision_flags(data_path: str, *extra: str) -> list[str]:
    return ["--config", EXAMPLE, "--data-path", data_path, "--expert-model-parallel-size", "1",
            *extra]


# -- 1 and 3: configuration ------------------------------------------------------------

def test_a_vision_run_needs_image_root(tmp_path):
    path = _write_mix(tmp_path)
    config = parse_run_config(_vision_flags(path, "--image-root", "none"))
    with pytest.raises(ConfigError, match="--vision-model-type needs --image-root"):
        validate_run_config(config, 1)
    validate_run_config(parse_run_config(_vision_flags(path, "--image-root", ".")), 1)


def test_seq_length_must_hold_the_image_tokens_and_some_text(tmp_path):
    path = _write_mix(tmp_path)
    flags = _vision_flags(path, "--image-root", str(tmp_path))  # 32x32 / patch 8: 16 tokens
    with pytest.raises(ConfigError, match=r"--seq-length \(24\) cannot hold an image sample: "
                                          r"16 image tokens .* = 32; raise --seq-length"):
        validate_run_config(parse_run_config(flags + ["--seq-length", "24"]), 1)
    validate_run_config(parse_run_config(flags + ["--seq-length", "32"]), 1)


# -- 2: the data -----------------------------------------------------------------------

def test_a_wrong_image_root_stops_before_training(tmp_path):
    path = _write_mix(tmp_path)
    wrong = tmp_path / "elsewhere"
    os.makedirs(wrong)
    mix = open_llava_mix(path, str(wrong), str(tmp_path / "cache"))
    assert mix.bad_samples.counts == {"missing_image": 30}
    with pytest.raises(DataError) as error:
        check_index_health(mix, max_fraction=0.01, needs_images=True)
    message = str(error.value)
    assert "30 of 40 records (75.0%) are unusable" in message
    assert "missing_image: 30 (e.g. img0, img1" in message and "check --image-root" in message
    # even with every bad record allowed, a vision model without a single image is refused
    with pytest.raises(DataError, match="none of the 10 usable records has an image"):
        check_index_health(mix, max_fraction=1.0, needs_images=True)
    check_index_health(mix, max_fraction=1.0, needs_images=False)  # a text model may


def test_the_threshold_at_index_time(tmp_path):
    path = _write_mix(tmp_path, n_image=100, n_text=0)
    os.remove(tmp_path / "img" / "0.png")
    mix = open_llava_mix(path, str(tmp_path), str(tmp_path / "cache"))
    check_index_health(mix, max_fraction=0.01, needs_images=True)  # 1 of 100 is allowed
    os.remove(tmp_path / "img" / "1.png")
    os.utime(path)  # the index is rebuilt when the data file changes
    mix = open_llava_mix(path, str(tmp_path), str(tmp_path / "cache2"))
    with pytest.raises(DataError, match="2 of 100 records"):
        check_index_health(mix, max_fraction=0.01, needs_images=True)


def test_images_that_do_not_fit_stop_the_run_in_use(tmp_path):
    """A long question before the image pushes the image tokens past --seq-length: every
    such record is image_truncated in use; the check names the kind and the fix."""
    path = _write_mix(tmp_path, n_image=30, n_text=4, question_words=40)
    loader = ImagePreprocessor(16, 16, CLIP_MEAN, CLIP_STD, backend="pil")
    dataset, _ = build_llava_dataset(path, str(tmp_path), str(tmp_path / "cache"), seed=1,
                                     seq_length=40, num_image_tokens=4, image_loader=loader,
                                     vocab_size=64)
    batch = dataset.batch(list(range(len(dataset))))
    assert batch["images"] is None  # only text-only records were left to train on
    assert dataset.bad_samples.counts == {"image_truncated": 30}
    with pytest.raises(DataError) as error:
        check_in_use_health(dataset.bad_samples, consumed_samples=34, max_fraction=0.01)
    assert "30 of the 64 records tried so far" in str(error.value)
    assert "image_truncated: 30 (e.g. img" in str(error.value)
    assert "raise --seq-length" in str(error.value)
    check_in_use_health(dataset.bad_samples, consumed_samples=34, max_fraction=0.5)


def test_a_handful_of_bad_samples_does_not_stop_a_run(tmp_path):
    from megatron_stgc.data.llava_index import BadSampleCounter

    few = BadSampleCounter()
    for i in range(MIN_BAD_IN_USE - 1):
        few.add("corrupt_image", f"r{i}")
    check_in_use_health(few, consumed_samples=8, max_fraction=0.01)
    few.add("corrupt_image", "one-more")
    with pytest.raises(DataError, match="corrupt_image: 10"):
        check_in_use_health(few, consumed_samples=8, max_fraction=0.01)


# -- end to end: the trainer prints the index report and stops with a clear message ---------

def _train(tmp_path, *flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "megatron_stgc", "train", "--config", EXAMPLE,
               "--expert-model-parallel-size", "1", "--global-batch-size", "8",
               "--micro-batch-size", "4", "--train-iters", "3", "--log-interval", "1",
               "--num-workers", "0", "--vocab-size", "128", "--save", "none", "--load", "none",
               "--save-interval", "none", "--log-file", str(tmp_path / "log.jsonl"),
               "--cache-dir", str(tmp_path / "cache"), *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)


def test_training_with_a_wrong_root_ends_with_a_data_error_before_step_1(tmp_path):
    path = _write_mix(tmp_path)
    os.makedirs(tmp_path / "wrong")
    done = _train(tmp_path, "--data-path", path, "--image-root", str(tmp_path / "wrong"))
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-4000:]
    assert "megatron-stgc: data error: --data-path: 30 of 40 records" in done.stderr
    assert "missing_image: check --image-root" in done.stderr
    assert "mix.json: 10 of 40 records usable" in done.stdout  # the index report, first
    assert "step 1/" not in done.stdout and "Traceback" not in done.stderr


def test_training_stops_on_the_first_log_step_when_images_are_corrupt(tmp_path):
    path = _write_mix(tmp_path, n_image=60, n_text=0, corrupt=48)
    done = _train(tmp_path, "--data-path", path, "--image-root", str(tmp_path))
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-4000:]
    assert "were unusable in use, more than --max-bad-sample-fraction 0.01" in done.stderr
    assert "corrupt_image: " in done.stderr and "the image files cannot be decoded" in done.stderr
    assert "step 2/" not in done.stdout
    # with the threshold raised the same data trains (and says what it skipped)
    done = _train(tmp_path, "--data-path", path, "--image-root", str(tmp_path),
                  "--max-bad-sample-fraction", "0.9", "--train-iters", "1")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "corrupt_image" in done.stdout


# -- the text-only loader -----------------------------------------------------------------

def test_text_loader_counts_bad_records_by_kind_and_names_the_file(tmp_path):
    good = [{"question": f"Q{i}?", "answer": f"A{i}."} for i in range(6)]
    lines = [json.dumps(r) for r in good[:3]] + [
        '{"question": "broken', json.dumps([1, 2]), json.dumps({"text": "x"}),
        json.dumps({"question": "Q?", "answer": 3}), json.dumps({"id": "turns",
                                                                 "conversations": [{"from": 1}]}),
        json.dumps({"question": "nul\u0000", "answer": "a"})] + [json.dumps(r) for r in good[3:]]
    first = tmp_path / "qa.jsonl"
    first.write_text("\n".join(lines) + "\n")
    second = tmp_path / "more.json"
    second.write_text(json.dumps([{"prompt": "P?", "response": "R."}, {"prompt": "P2?"}]))
    records = read_text_records([str(first), str(second)])
    assert [c.answer for c in records.conversations] == [f"A{i}." for i in range(6)] + ["R."]
    assert records.num_records == 14
    assert records.bad.counts == {"malformed_json": 2, NO_QUESTION_ANSWER: 1, BAD_FIELD: 2,
                                  "bad_turn": 1, "nul_character": 1}
    assert records.bad.examples["malformed_json"] == ["qa.jsonl:#3", "qa.jsonl:#4"]
    assert records.bad.examples[BAD_FIELD] == ["qa.jsonl:#6", "more.json:#1"]
    assert records.bad.examples["bad_turn"] == ["qa.jsonl:turns"]
    with pytest.raises(DataError, match=r"7 of 14 records \(50.0%\) are unusable"):
        check_text_health(records.bad, records.num_records, max_fraction=0.01)
    check_text_health(records.bad, records.num_records, max_fraction=0.6)
