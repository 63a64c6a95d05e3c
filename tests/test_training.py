"""The main job end to end under torchrun (2 CPU processes, EP=2, alltoall).

* the loss falls on the embedded instruction-style data;
* a run stopped after 10 steps and resumed from its checkpoint continues
  exactly: the straight run logs every step (--log-interval 1), the resumed run every
  5 steps, and each of its records equals the mean (loss, grad norm) or the sum (tokens
  per expert) of the straight run's 5 steps;
* the JSONL log carries the step metrics, one record per log interval.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from launch_utils import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "examples", "tiny_moe_cpu.yaml")
STEPS = 20


def _torchrun(*flags: str, cache_dir: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(free_port()), "-m", "megatron_stgc", "train",
               "--config", EXAMPLE, "--train-iters", str(STEPS), "--cache-dir", cache_dir,
               *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done




def _records(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    cache = str(root / "cache")
    straight = str(root / "straight")
    _torchrun("--save", straight, "--load", straight, "--log-file", f"{straight}/log.jsonl",
              "--log-interval", "1", cache_dir=cache)
    resumed = str(root / "resumed")
    common = ("--save", resumed, "--load", resumed, "--save-interval", "10",
              "--log-file", f"{resumed}/log.jsonl", "--log-interval", "5")
    first = _torchrun(*common, "--exit-interval", "10", cache_dir=cache)
    second = _torchrun(*common, cache_dir=cache)
    return {"straight": straight, "resumed": resumed, "first": first, "second": second}


def test_loss_falls_on_the_embedded_default(runs):
    losses = [record["loss"] for record in _records(f"{runs['straight']}/log.jsonl")]
    assert len(losses) == STEPS
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0, losses


def test_resume_continues_exactly(runs):
    straight = _records(f"{runs['straight']}/log.jsonl")
    resumed = _records(f"{runs['resumed']}/log.jsonl")
    assert [r["iteration"] for r in straight] == list(range(1, STEPS + 1))
    assert [r["steps"] for r in straight] == [1] * STEPS
    assert [(r["iteration"], r["steps"]) for r in resumed] == [(5, 5), (10, 5), (15, 5), (20, 5)]
    assert "resumed from" in runs["second"].stdout
    for b in resumed:
        steps = straight[b["iteration"] - 5:b["iteration"]]
        assert b["loss"] == sum(a["loss"] for a in steps) / 5, b["iteration"]
        assert b["grad_norm"] == sum(a["grad_norm"] for a in steps) / 5
        assert b["lr"] == steps[-1]["lr"]
        assert b["consumed_samples"] == steps[-1]["consumed_samples"]
        for layer, counts in b["tokens_per_expert"].items():
            assert counts == [sum(column) for column in
                              zip(*(a["tokens_per_expert"][layer] for a in steps))]
        aux = sum(a["moe/load_balancing_loss"] for a in steps) / 5
        assert b["moe/load_balancing_loss"] == pytest.approx(aux, rel=1e-5)


def test_checkpoints_are_published_with_a_tracker(runs):
    resumed = runs["resumed"]
    with open(os.path.join(resumed, "latest_checkpointed_iteration.txt")) as f:
        assert f.read().strip() == str(STEPS)
    entries = sorted(os.listdir(resumed))
    assert "iter_0000010" in entries and "iter_0000020" in entries
    assert not [e for e in entries if ".tmp" in e], entries


def test_jsonl_has_the_step_metrics(runs):
    record = _records(f"{runs['resumed']}/log.jsonl")[-1]
    for key in ("iteration", "steps", "loss", "lr", "grad_norm", "tokens_per_second",
                "step_time_s", "moe/load_balancing_loss", "tokens_per_expert"):
        assert key in record, key
    # 4 layers, MoE on every other layer (1 and 3, 1-based), 4 experts, top-2; the counts
    # are sums over the record's 5 steps:
    per_layer = record["tokens_per_expert"]
    assert sorted(per_layer) == ["layer_1", "layer_3"]
    # every real (non-padding) position of the 5 steps' global batches (32 rows x 64 each)
    # is routed top-2
    computed = record["steps"] * 32 * 64
    real = round(record["real_token_fraction"] * computed)
    assert 0.5 * computed < real < computed  # rows packed greedily, padding at their ends
    assert all(sum(counts) == 2 * real and len(counts) == 4 for counts in per_layer.values())


def test_progress_lines_are_printed(runs):
    lines = [line for line in runs["first"].stdout.splitlines() if line.startswith("step ")]
    assert lines and lines[-1].startswith(f"step 10/{STEPS} | loss ")
