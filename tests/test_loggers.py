"""A requested logger that cannot start is a config error before training (TensorBoard,
Weights & Biases); with wandb installed, --wandb-project logs the records (offline mode)."""

from __future__ import annotations

import importlib.util
import os

import pytest

from dist_utils import tiny_config
from megatron_stgc.validation import config_problems

HAS_WANDB = importlib.util.find_spec("wandb") is not None
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def test_missing_logger_packages_are_config_errors(tmp_path):
    problems = config_problems(tiny_config(tensorboard_dir=str(tmp_path / "tb"),
                                           wandb_project="p"), world_size=1)
    tensorboard_error = (f"--tensorboard-dir {tmp_path / 'tb'}: the tensorboard package is not "
                         "installed (pip install tensorboard)")
    wandb_error = "--wandb-project p: the wandb package is not installed (pip install wandb)"
    assert (tensorboard_error in problems) == (not HAS_TENSORBOARD)
    assert (wandb_error in problems) == (not HAS_WANDB)


def test_wandb_names_need_a_project():
    problems = config_problems(tiny_config(wandb_exp_name="run1", wandb_save_dir="/tmp/x"), 1)
    assert "--wandb-exp-name needs --wandb-project" in problems
    assert "--wandb-save-dir needs --wandb-project" in problems


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (optional)")
def test_wandb_offline_run_is_written(tmp_path, monkeypatch):
    import io

    from megatron_stgc.training.logging import StepLogger, open_wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = tiny_config(wandb_project="stgc-test", wandb_exp_name="offline-check",
                         wandb_save_dir=str(tmp_path))
    run = open_wandb(config)
    logger = StepLogger(0, 2, wandb_run=run, stream=io.StringIO())
    logger.log({"iteration": 1, "loss": 2.5, "lr": 1e-3})
    logger.log({"iteration": 2, "loss": 2.0, "lr": 1e-3})
    logger.close()
    runs = [d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1
    folder = tmp_path / "wandb" / runs[0]
    [log] = [name for name in os.listdir(folder) if name.endswith(".wandb")]
    data = (folder / log).read_bytes()  # protobuf records; history values are JSON text
    assert b"offline-check" in data
    assert data.count(b"\x04loss") >= 2 and b"2.5" in data  # a history row per record


def test_progress_line_has_wall_clock_eta_and_memory():
    import io

    from megatron_stgc.training.logging import StepLogger

    times = iter([100.0, 130.0, 160.0])  # the first log at t=100, then 15 s per step
    stream = io.StringIO()
    logger = StepLogger(0, 10, stream=stream, clock=lambda: next(times))
    for iteration in (2, 4, 6):
        logger.log({"iteration": iteration, "loss": 1.0})
    lines = [line.split(" | ") for line in stream.getvalue().splitlines()]
    assert lines[0][2:4] == ["elapsed 0s", lines[0][3]] and lines[0][3].startswith("mem ")
    assert lines[1][2:4] == ["elapsed 30s", "eta 1m30s"]  # 6 steps left x 15 s
    assert lines[2][2:4] == ["elapsed 1m00s", "eta 1m00s"]  # 4 steps left x 15 s
    memory = float(lines[2][4].split()[1])
    assert lines[2][4].endswith(" GiB") and memory > 0
