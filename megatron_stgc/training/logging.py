"""Logging on log steps: a progress line, a JSONL record, optional TensorBoard.

Only rank 0 writes. The training loop calls ``log`` on log steps only (every
``--log-interval`` steps, at checkpoint saves and at the run's last step), each
record covering the steps since the previous one (``steps``; what each value means:
training/interval_metrics.py). A JSONL record is one JSON object per line with at
least ``iteration``, ``steps``, ``loss``, ``lr``, ``grad_norm``,
``tokens_per_second`` (real tokens: padding positions are not counted),
``real_token_fraction`` (real / computed positions), ``step_time_s``,
``moe/load_balancing_loss`` (for MoE models), ``tokens_per_expert``
({"layer_<n>": [...]}, padding not counted) and every value produced by the sources in
``training.metrics``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Optional

PROGRESS_KEYS = ("loss", "moe/load_balancing_loss", "stgc/token_loss", "stgc/conflict_fraction",
                 "lr", "grad_norm", "tokens_per_second")


def _format(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


class StepLogger:
    """Writes log records (call ``log`` on every rank; only rank 0 writes)."""

    def __init__(self, rank: int, train_iters: int, log_file: Optional[str] = None,
                 tensorboard_dir: Optional[str] = None,
                 progress_keys: tuple[str, ...] = PROGRESS_KEYS, stream=None):
        self.is_writer = rank == 0
        self.train_iters = train_iters
        self.progress_keys = progress_keys
        self.stream = stream or sys.stdout
        self.jsonl = None
        self.tensorboard = None
        if not self.is_writer:
            return
        if log_file is not None:
            os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
            # append: a resumed run continues the same log
            self.jsonl = open(log_file, "a", buffering=1)
        if tensorboard_dir is not None:
            self.tensorboard = _open_tensorboard(tensorboard_dir, self.stream)

    def log(self, record: dict[str, Any]) -> None:
        if not self.is_writer:
            return
        iteration = record["iteration"]
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(_jsonable(record)) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "iteration":
                    self.tensorboard.add_scalar(key, value, iteration)
        parts = [f"step {iteration}/{self.train_iters}"]
        parts += [f"{key} {_format(record[key])}" for key in self.progress_keys
                  if key in record and record[key] is not None]
        print(" | ".join(parts), file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self.is_writer:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value


def _open_tensorboard(directory: str, stream):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print(f"--tensorboard-dir {directory}: tensorboard is not installed "
              "(pip install tensorboard); TensorBoard logging is off", file=stream, flush=True)
        return None
    return SummaryWriter(log_dir=directory)
