"""The tiny MoE-LLaVA end to end under torchrun: 2 CPU processes, EP=2, STGC on.

Trains on the real-image digits mix (the README's main job, shortened), checks
that the loss falls and that per-modality expert loads and STGC metrics are
logged, then runs ``megatron-stgc eval`` on a slice of the validation
questions: every question gets an answer line in LLaVA's layout and the
scores are written.
"""

from __future__ import annotations

import json
import math
import os

import pytest

from launch_utils import REPO, read_jsonl, run_job
from megatron_stgc.data.digits import build_digits_mix

EXAMPLE = os.path.join(REPO, "examples", "tiny_llava_digits.yaml")
STEPS = 40
PROBE_INTERVAL = 3  # the routing probe runs at the start and every 3 steps (fresh run: never)


def torchrun(command: str, flags: list[str], nproc: int = 2) -> list[str]:
    import sys

    from launch_utils import free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(free_port()), "-m", "megatron_stgc", command, *flags]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    mix = build_digits_mix(str(root / "data"))
    run = str(root / "run")
    flags = ["--config", EXAMPLE, "--data-path", mix["train"], "--image-root", mix["image_root"],
             "--cache-dir", str(root / "cache"), "--save", run, "--load", run,
             "--log-file", f"{run}/log.jsonl", "--train-iters", str(STEPS), "--log-interval", "1",
             "--save-interval", str(STEPS), "--lr-warmup-fraction", "0", "--stgc",
             "--num-workers", "2", "--routing-probe-interval", str(PROBE_INTERVAL)]
    output = run_job(torchrun("train", flags), str(root / "train.out"), timeout=600)
    return {"root": root, "mix": mix, "run": run, "flags": flags, "output": output}


def test_loss_falls_with_stgc_and_ep2(trained):
    records = read_jsonl(os.path.join(trained["run"], "log.jsonl"))
    assert [r["iteration"] for r in records] == list(range(1, STEPS + 1))
    first = sum(r["loss"] for r in records[:5]) / 5
    last = sum(r["loss"] for r in records[-5:]) / 5
    assert last < 0.6 * first, (first, last)


def test_modality_loads_and_stgc_metrics_are_logged(trained):
    record = read_jsonl(os.path.join(trained["run"], "log.jsonl"))[-1]
    loads = record["tokens_per_expert_by_modality"]
    assert set(loads) == {"layer_1", "layer_3"}
    for layer in loads.values():
        assert sum(layer["image"]) > 0 and sum(layer["text"]) > 0
        assert len(layer["image"]) == 4
    assert 0 <= record["stgc/conflict_fraction"] <= 1
    for layer in (1, 3):  # routing stability (training/routing_stability.py)
        for group in ("", "_text", "_image"):
            assert 0 <= record[f"routing/layer{layer}/load_tv{group}"] <= 1
    probed = [r for r in read_jsonl(os.path.join(trained["run"], "log.jsonl"))
              if "routing/topk_change" in r]
    assert [r["iteration"] for r in probed] == list(range(PROBE_INTERVAL, STEPS + 1,
                                                          PROBE_INTERVAL))
    assert all(0 <= r["routing/topk_change_image"] <= 1 for r in probed)
    assert all(0 < r["routing/entropy_image"] <= math.log(4) + 1e-9 for r in probed)
    assert record["bad_samples_in_use"] == 0
    assert "bad samples found in use (all ranks): none" in trained["output"]


def test_eval_answers_every_question_and_scores(trained):
    root, mix = trained["root"], trained["mix"]
    with open(mix["val_questions"]) as f:
        everything = [json.loads(line) for line in f]
    questions = [q for category in ("digit", "even", "greater_than_four", "plus_one", "text")
                 for q in [q for q in everything if q["category"] == category][:6]]
    # a question whose prompt cannot be built (<image> but no image): an error, not a crash
    questions.append({"question_id": "tag_without_image", "text": "<image>\nWhich digit?",
                      "category": "digit"})
    ids = {q["question_id"] for q in questions}
    question_file = root / "questions.jsonl"
    question_file.write_text("".join(json.dumps(q) + "\n" for q in questions))
    with open(mix["val_answers"]) as f:
        truth = [json.loads(line) for line in f]
    truth_file = root / "truth.jsonl"
    truth.append({"question_id": "tag_without_image", "answer": "0", "category": "digit"})
    truth_file.write_text("".join(json.dumps(t) + "\n" for t in truth if t["question_id"] in ids))
    answers, results = root / "answers.jsonl", root / "results.json"
    run_job(torchrun("eval", trained["flags"] + [
        "--question-file", str(question_file), "--ground-truth", str(truth_file),
        "--answers-file", str(answers), "--results-file", str(results)]),
        str(root / "eval.out"), timeout=300)
    lines = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [line["question_id"] for line in lines] == [q["question_id"] for q in questions]
    for line in lines:
        assert set(line) >= {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    scores = json.loads(results.read_text())
    assert scores["overall"]["total"] == len(questions)
    assert scores["overall"]["missing"] == 0
    assert scores["overall"]["errors"] == 1
    assert "image_tag_without_image" in lines[-1]["metadata"]["error"]
    assert set(scores["per_category"]) == {"digit", "even", "greater_than_four", "plus_one",
                                           "text"}
    # FP8's padding of every decoding step to a multiple of 16 tokens changes no answer
    padded = root / "answers_padded.jsonl"
    run_job(torchrun("eval", trained["flags"] + [
        "--question-file", str(question_file), "--answers-file", str(padded),
        "--eval-pad-to-multiple", "16"]), str(root / "eval_padded.out"), timeout=300)
    padded_lines = [json.loads(line) for line in padded.read_text().splitlines()]
    assert [line["text"] for line in padded_lines] == [line["text"] for line in lines]


def pope_from_digits(root, mix, count: int = 16):
    """A POPE-layout benchmark folder (questions, val2014/ images, coco/ labels) from the
    first ``count`` "even" validation questions: its own image folder, not --image-root."""
    import shutil

    with open(mix["val_questions"]) as f:
        questions = [q for q in map(json.loads, f) if q["category"] == "even"][:count]
    with open(mix["val_answers"]) as f:
        truth = {t["question_id"]: t["answer"] for t in map(json.loads, f)}
    folder = root / "pope"
    (folder / "val2014").mkdir(parents=True)
    (folder / "coco").mkdir()
    for q in questions:
        shutil.copy(os.path.join(mix["image_root"], q["image"]), folder / "val2014")
    lines = [{"question_id": q["question_id"], "image": os.path.basename(q["image"]),
              "text": q["text"], "category": "random"} for q in questions]
    (folder / "llava_pope_test.jsonl").write_text("".join(json.dumps(q) + "\n" for q in lines))
    (folder / "coco" / "coco_pope_random.json").write_text("".join(
        json.dumps({**q, "label": truth[q["question_id"]]}) + "\n" for q in lines))
    return folder


def test_eval_layouts_and_the_cache_give_the_same_answers(trained):
    """megatron-stgc eval builds only the model: one process (EP 1, no KV cache, no
    --data-path: the tokenizer file given), two processes with EP 2 and with DP 2 x EP 1
    (KV cache, tokenizer found in the run's cache) answer a POPE-layout benchmark the same."""
    import glob

    root = trained["root"]
    bench = pope_from_digits(root, trained["mix"])
    flags = trained["flags"]
    at = flags.index("--data-path")
    without_data = flags[:at] + ["--data-path", "none"] + flags[at + 2:]  # the YAML names one
    [tokenizer] = glob.glob(str(root / "cache" / "spm-*.model"))
    runs = {  # name: (processes, flags)
        "one": (1, without_data + ["--tokenizer-model", tokenizer,
                                   "--expert-model-parallel-size", "1", "--no-kv-cache"]),
        "ep2": (2, flags),
        "dp2": (2, flags + ["--expert-model-parallel-size", "1"]),
    }
    answers, outputs = {}, {}
    for name, (nproc, run_flags) in runs.items():
        outputs[name] = run_job(torchrun("eval", run_flags + [
            "--benchmark", "pope", "--benchmark-dir", str(bench), "--model-id", name,
            "--prompt-suffix", "",  # the toy was trained without POPE's suffix (--seq-length 48)
            "--results-file", str(root / f"pope_{name}.json")], nproc=nproc),
            str(root / f"eval_pope_{name}.out"), timeout=300)
        lines = [json.loads(line) for line in (bench / "answers" / f"{name}.jsonl").open()]
        answers[name] = [(line["question_id"], line["text"]) for line in lines]
        scores = json.loads((root / f"pope_{name}.json").read_text())
        assert scores["per_category"]["random"]["questions"] == 16
        assert scores["counts"]["missing"] == 0 and scores["counts"]["errors"] == 0
    assert "no KV cache" in outputs["one"] and ", KV cache" in outputs["ep2"]
    assert all(text for _, text in answers["one"])
    assert answers["ep2"] == answers["one"] and answers["dp2"] == answers["one"]


def test_export_gathers_every_expert_into_one_pretrained_checkpoint(trained):
    """megatron-stgc export: the EP=2 checkpoint (2 experts per rank) resharded into one
    process; model.pt holds all 4 experts of each MoE layer, distinct, loadable as
    --pretrained-checkpoint."""
    import torch

    from megatron_stgc.model.pretrained import read_pretrained

    out = trained["root"] / "exported"
    command = torchrun("export", ["--output", str(out)] + trained["flags"])
    command[command.index("--nproc-per-node") + 1] = "1"
    run_job(command, str(trained["root"] / "export.out"), timeout=300)
    parts = read_pretrained(str(out))
    assert set(parts) == {"vision_model", "vision_projection", "language_model"}
    lm = parts["language_model"]
    for layer in (0, 2):
        experts = [lm[f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.linear_fc1.weight"]
                   for e in range(4)]
        assert all(not torch.equal(experts[0], other) for other in experts[1:])
    assert "decoder.layers.1.mlp.linear_fc1.weight" in lm  # the dense layer between


def test_a_fresh_run_repeats_every_loss_exactly(trained, tmp_path):
    """Same command and seed, fresh directories (data built anew, tokenizer trained anew, no
    cache), batches made in the training process instead of 2 DataLoader workers, and no
    routing probe (the fixture probes every 3 steps): the first 10 steps give bit-identical
    losses and gradient norms on this machine.
    (Across machines the numbers differ: docs/MAIN_JOB.md, "Reproducibility".)"""
    mix = build_digits_mix(str(tmp_path / "data"))
    run = str(tmp_path / "run")
    flags = ["--config", EXAMPLE, "--data-path", mix["train"], "--image-root", mix["image_root"],
             "--cache-dir", str(tmp_path / "cache"), "--save", run, "--load", run,
             "--log-file", f"{run}/log.jsonl", "--train-iters", str(STEPS), "--log-interval", "1",
             "--exit-interval", "10", "--lr-warmup-fraction", "0", "--stgc", "--num-workers", "0",
             "--routing-probe-interval", "0"]
    run_job(torchrun("train", flags), str(tmp_path / "train.out"), timeout=600)
    fresh = [r for r in read_jsonl(f"{run}/log.jsonl") if "loss" in r]
    first = [r for r in read_jsonl(f"{trained['run']}/log.jsonl") if "loss" in r][:10]
    assert len(fresh) == 10
    assert [(r["loss"], r["grad_norm"]) for r in fresh] == [(r["loss"], r["grad_norm"])
                                                             for r in first]
    assert [r["stgc/conflict_fraction"] for r in fresh] == [r["stgc/conflict_fraction"]
                                                            for r in first]
