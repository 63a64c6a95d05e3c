"""Logging on log steps: a progress line, a JSONL record, optional TensorBoard and Weights &
Biases (the config check refuses either when its package is missing: config._validate_loggers).

Only rank 0 writes. The training loop calls ``log`` on log steps only (every
``--log-interval`` steps, at checkpoint saves and at the run's last step), each
record covering the steps since the previous one (``steps``; what each value means:
training/interval_metrics.py). A JSONL record is one JSON object per line with at
least ``iteration``, ``steps``, ``loss``, ``lr``, ``grad_norm``,
``tokens_per_second`` (real tokens: padding positions are not counted),
``real_token_fraction`` (real / computed positions), ``step_time_s``,
``moe/load_balancing_loss`` (for MoE models), ``tokens_per_expert``
({"layer_<n>": [...]}, padding not counted) and every value produced by the sources in
``training.metrics``; validation steps (--eval-interval, the end with --valid-data-path) add
``valid/lm_loss``, ``valid/ppl``, ``valid/tokens``, ``valid/samples``, ``valid/time_s``
(training/validation.py).
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from typing import Any, Callable, Optional

import torch

PROGRESS_KEYS = ("loss", "moe/load_balancing_loss", "stgc/token_loss", "stgc/conflict_fraction",
                 "lr", "grad_norm", "tokens_per_second", "valid/lm_loss", "valid/ppl")


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
                 progress_keys: tuple[str, ...] = PROGRESS_KEYS, stream=None, wandb_run=None,
                 clock: Callable[[], float] = time.monotonic):
        self.is_writer = rank == 0
        self.train_iters = train_iters
        self.progress_keys = progress_keys
        self.stream = stream or sys.stdout
        self.jsonl = None
        self.tensorboard = None
        self.wandb = wandb_run if self.is_writer else None  # a wandb Run, opened on rank 0
        self.clock = clock
        self.first_log: Optional[tuple[int, float]] = None  # (iteration, clock) of the first log
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
        if self.wandb is not None:
            self.wandb.log({key: value for key, value in record.items()
                            if isinstance(value, (int, float)) and key != "iteration"},
                           step=iteration)
        parts = [f"step {iteration}/{self.train_iters}"]
        parts += [f"{key} {_format(record[key])}" for key in self.progress_keys
                  if key in record and record[key] is not None]
        parts += self._time_and_memory(iteration)
        print(" | ".join(parts), file=self.stream, flush=True)

    def _time_and_memory(self, iteration: int) -> list[str]:
        """Wall clock since the first log, the ETA at the rate since then, peak memory."""
        now = self.clock()
        if self.first_log is None:
            self.first_log = (iteration, now)
        first_iteration, started = self.first_log
        parts = [f"elapsed {_duration(now - started)}"]
        if iteration > first_iteration:
            per_step = (now - started) / (iteration - first_iteration)
            parts.append(f"eta {_duration(per_step * max(self.train_iters - iteration, 0))}")
        return parts + [f"mem {_peak_memory_gib():.2f} GiB"]

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
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _duration(seconds: float) -> str:
    """'1h02m03s' / '2m03s' / '3s'."""
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _peak_memory_gib() -> float:
    """Peak GPU memory allocated by this process, or on CPU its peak resident set size."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value


def _open_tensorboard(directory: str, stream):
    from torch.utils.tensorboard import SummaryWriter  # checked with the config

    return SummaryWriter(log_dir=directory)


def open_wandb(config):
    """A Weights & Biases run for --wandb-project (call on rank 0 only), or None."""
    log = config.logging
    if log.wandb_project is None:
        return None
    import wandb  # checked with the config

    if log.wandb_save_dir is not None:
        os.makedirs(log.wandb_save_dir, exist_ok=True)
    return wandb.init(project=log.wandb_project, name=log.wandb_exp_name,
                      dir=log.wandb_save_dir, config=config.to_dict())
