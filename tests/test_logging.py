"""The metric-source registry and the JSONL/progress step logger."""

from __future__ import annotations

import io
import json

import pytest

from megatron_stgc.training import metrics
from megatron_stgc.training.logging import StepLogger


@pytest.fixture(autouse=True)
def clean_registry():
    before = metrics.registered_metric_sources()
    yield
    for name in metrics.registered_metric_sources():
        if name not in before:
            metrics.unregister_metric_source(name)


def test_registered_sources_are_collected_each_call():
    calls = []
    metrics.register_metric_source("test/a", lambda: calls.append(1) or {"a/x": 1, "a/y": 2.5})
    metrics.register_metric_source("test/b", lambda: {"b/z": 3})
    assert metrics.collect_registered_metrics() == {"a/x": 1.0, "a/y": 2.5, "b/z": 3.0}
    metrics.collect_registered_metrics()
    assert len(calls) == 2


def test_duplicate_metric_keys_are_an_error():
    metrics.register_metric_source("test/a", lambda: {"same": 1})
    metrics.register_metric_source("test/b", lambda: {"same": 2})
    with pytest.raises(KeyError, match="same"):
        metrics.collect_registered_metrics()


def test_source_must_return_a_dict():
    metrics.register_metric_source("test/bad", lambda: 1.0)
    with pytest.raises(TypeError, match="test/bad"):
        metrics.collect_registered_metrics()


def test_step_logger_writes_jsonl_and_progress(tmp_path):
    stream = io.StringIO()
    path = tmp_path / "logs" / "train.jsonl"
    logger = StepLogger(rank=0, train_iters=4, log_file=str(path), stream=stream)
    for step in (2, 4):  # the loop calls log on log steps only
        logger.log({"iteration": step, "steps": 2, "loss": 5.0 - step, "lr": 1e-3,
                    "grad_norm": float("nan"), "tokens_per_expert": {"layer_1": [1, 2]},
                    "stgc/conflict_fraction": 0.1})
    logger.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["iteration"] for r in records] == [2, 4]
    assert records[0]["stgc/conflict_fraction"] == 0.1 and records[0]["grad_norm"] == "nan"
    printed = stream.getvalue().splitlines()
    assert [line.split(" |")[0] for line in printed] == ["step 2/4", "step 4/4"]


def test_only_rank_zero_writes(tmp_path):
    stream = io.StringIO()
    path = tmp_path / "train.jsonl"
    logger = StepLogger(rank=1, train_iters=1, log_file=str(path), stream=stream)
    logger.log({"iteration": 1, "loss": 1.0})
    logger.close()
    assert not path.exists() and stream.getvalue() == ""
