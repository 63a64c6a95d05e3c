"""Log metrics kept on the device between log steps, reduced and read on log steps only.

A step adds its per-micro-batch LM loss sums (device tensors, no host copy) and the grad
norm megatron's optimizer already returned; the routers' expert counts, megatron's MoE loss
tracker and the STGC / LTDR sums accumulate on their own. On a log step (every
``--log-interval`` steps, every checkpoint save and the run's last step) ``record()`` runs
the reductions (one all-reduce per source, as one step used to) and returns ONE JSONL
record for the steps since the previous log step:

  iteration, consumed_samples   at the log step
  steps                         how many steps the record covers
  loss                          mean over those steps of each step's global token-weighted
                                LM loss (each step's loss is formed exactly, then averaged)
  lr, update_successful         of the log step
  grad_norm                     mean over the covered steps that had one
  step_time_s                   wall time of the covered steps / steps (data waits included)
  tokens_per_second             real (non-padding) token positions of the covered steps / their
                                wall time
  real_token_fraction           real token positions / computed positions (padding counted)
  moe/*                         megatron's MoE losses, mean over the steps (and MoE layers)
  tokens_per_expert[_by_modality]  SUMS over the covered steps (so sums over records equal
                                sums over steps whatever --log-interval is)
  stgc/*, ltdr/*                ratios of the sums over the covered steps (their modules)
  skipped_steps, bad_samples_in_use  running totals of the run
"""

from __future__ import annotations

import time
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_stgc import parallel
from megatron_stgc.config import RunConfig, moe_layer_freq_value
from megatron_stgc.mcore_compat import report_moe_metrics
from megatron_stgc.training import metrics
from megatron_stgc.training.expert_load import ExpertLoadCounter
from megatron_stgc.training.step import StepResult


def is_log_step(config: RunConfig, iteration: int, saving: bool, last: bool) -> bool:
    """Whether ``iteration`` (1-based, just finished) reduces and writes a log record."""
    return iteration % config.logging.log_interval == 0 or saving or last


class IntervalMetrics:
    """What the steps since the last log step leave for the log."""

    def __init__(self, config: RunConfig, expert_load: ExpertLoadCounter, n_micro: int):
        self.config = config
        self.expert_load = expert_load
        self.n_micro = n_micro
        self._reset()

    def _reset(self) -> None:
        # per step: float64 [4] (loss sum, loss tokens, real positions, computed positions), local
        self.loss_sums: list[torch.Tensor] = []
        self.grad_norms: list[float] = []
        self.steps = 0
        self.started = time.perf_counter()

    def restart_clock(self) -> None:
        """The next record's step time starts now (after work that is no step's, validation)."""
        self.started = time.perf_counter()

    def add_step(self, result: StepResult) -> None:
        """After a step: keep its loss sums on the device (no host sync)."""
        totals = torch.zeros(4, dtype=torch.float64, device=parallel.collective_device())
        for micro_batch in result.losses:
            totals[:2] += micro_batch["lm_loss"].detach().to(totals)
            totals[2:] += micro_batch["positions"].detach().to(totals)
        self.loss_sums.append(totals)
        if result.grad_norm is not None:
            self.grad_norms.append(result.grad_norm)
        self.steps += 1
        self.last_result = result

    def step_totals(self) -> tuple[list[float], float, float]:
        """(each covered step's global token-weighted loss, real and computed token positions
        of all covered steps), summed over DP ranks in one all-reduce."""
        stacked = torch.stack(self.loss_sums)  # [steps, 4]
        dist.all_reduce(stacked, group=parallel_state.get_data_parallel_group())
        losses = (stacked[:, 0] / stacked[:, 1].clamp(min=1)).tolist()
        return losses, float(stacked[:, 2].sum()), float(stacked[:, 3].sum())

    def record(self, iteration: int, consumed_samples: int) -> tuple[dict[str, Any], list[float]]:
        """(the log record of the covered steps, their per-step losses); collective; resets."""
        losses, real, computed = self.step_totals()
        seconds = time.perf_counter() - self.started
        result = self.last_result
        record: dict[str, Any] = {
            "iteration": iteration,
            "consumed_samples": consumed_samples,
            "steps": self.steps,
            "loss": sum(losses) / len(losses),
            "lr": result.lr,
            "grad_norm": _mean(self.grad_norms),
            "update_successful": result.update_successful,
            "step_time_s": seconds / self.steps,
            "tokens_per_second": real / seconds,  # padding not counted
            "real_token_fraction": real / max(computed, 1.0),
        }
        record.update(self._moe_losses())
        record["tokens_per_expert"] = self.expert_load.collect()
        if self.expert_load.by_modality:
            record["tokens_per_expert_by_modality"] = self.expert_load.collect_by_modality()
        record.update(metrics.collect_registered_metrics())
        self._reset()
        return record, losses

    def _moe_losses(self) -> dict[str, float]:
        """megatron-core's tracked MoE losses: mean over MoE layers, micro-batches and steps
        (its tracker sums every forward since its last report)."""
        m = self.config.model
        if m.num_experts is None:
            return {}
        totals = report_moe_metrics(loss_scale=1.0 / (self.n_micro * self.steps),
                                    num_layers=m.num_layers,
                                    moe_layer_freq=moe_layer_freq_value(self.config))
        return {f"moe/{name}": value for name, value in totals.items()}


def _mean(values: list[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None
