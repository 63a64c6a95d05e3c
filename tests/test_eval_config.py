"""``megatron-stgc eval`` refuses bad flags and bad benchmark files before any process group
exists, naming the flag or the file; what it builds is only the model."""

from __future__ import annotations

import json
import os

import pytest

from launch_utils import REPO
from megatron_stgc.cli import main

EXAMPLE = os.path.join(REPO, "examples", "tiny_llava_digits.yaml")


def pope_dir(tmp_path):
    d = tmp_path / "pope"
    (d / "val2014").mkdir(parents=True)
    (d / "coco").mkdir()
    line = {"question_id": 0, "image": "0.jpg", "text": "Is there a dog?", "category": "random"}
    (d / "llava_pope_test.jsonl").write_text(json.dumps(line) + "\n")
    (d / "coco" / "coco_pope_random.json").write_text(json.dumps({**line, "label": "yes"}) + "\n")
    return d


def run_eval(tmp_path, *flags):
    load = tmp_path / "ckpt"
    load.mkdir(exist_ok=True)
    return main(["eval", "--config", EXAMPLE, "--load", str(load), "--data-path", "none",
                 "--image-root", "none", "--save", str(tmp_path / "s"), "--cache-dir", str(tmp_path / "c"),
                 "--expert-model-parallel-size", "1", *flags])


@pytest.mark.parametrize("flags, message", [
    (["--benchmark", "pope", "--benchmark-dir", "{d}", "--kv-cache",
      "--eval-pad-to-multiple", "16"],
     "--kv-cache decodes one token per step; the steps must be padded to a multiple of 16"),
    (["--benchmark", "pope", "--benchmark-dir", "{d}", "--max-new-tokens", "0"],
     "--max-new-tokens must be >= 1, got 0"),
    (["--benchmark", "pope", "--benchmark-dir", "{d}", "--eval-batch-size", "0"],
     "--eval-batch-size must be >= 1, got 0"),
    (["--benchmark", "pope", "--benchmark-dir", "{d}", "--image-folder", "{d}/nowhere"],
     "--image-folder: {d}/nowhere is not a directory"),
    (["--benchmark", "pope"], "--benchmark pope needs --benchmark-dir"),
    (["--benchmark", "pope", "--benchmark-dir", "{d}", "--moe-token-dispatcher-type",
      "allgather", "--expert-model-parallel-size", "2"],
     "eval needs --moe-token-dispatcher-type alltoall"),
])
def test_bad_eval_flags_name_the_flag(tmp_path, capsys, flags, message):
    d = str(pope_dir(tmp_path))
    assert run_eval(tmp_path, *[f.format(d=d) for f in flags]) == 2
    assert message.format(d=d) in capsys.readouterr().err


def test_eval_needs_a_checkpoint(capsys):
    assert main(["eval", "--config", EXAMPLE, "--load", "none", "--benchmark", "pope"]) == 2
    assert "eval needs --load" in capsys.readouterr().err


def test_bad_ground_truth_is_found_before_decoding(tmp_path, capsys):
    """A label file of other images: refused before any model is built (the training batch
    flags, which do not fit here, are not eval's concern)."""
    d = pope_dir(tmp_path)
    other = {"question_id": 0, "image": "COCO_val2014_1.jpg", "text": "?", "label": "no"}
    (d / "coco" / "coco_pope_random.json").write_text(json.dumps(other) + "\n")
    assert run_eval(tmp_path, "--benchmark", "pope", "--benchmark-dir", str(d),
                    "--global-batch-size", "7") == 2
    err = capsys.readouterr().err
    assert "benchmark file error: label file" in err and "coco_pope_random.json:1" in err
