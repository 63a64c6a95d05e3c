"""One optimizer step: forward/backward over micro-batches, clip, update, LR step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_stgc.training.forward import gpt_forward_step


@dataclass
class StepResult:
    """Outputs of ``train_step``; ``losses`` is this rank's per-micro-batch loss dicts."""

    losses: list[dict[str, torch.Tensor]] = field(default_factory=list)
    grad_norm: float | None = None
    num_zeros_in_grad: int | None = None
    update_successful: bool = True
    lr: float = 0.0


def train_step(
    model: list[torch.nn.Module],
    optimizer,
    scheduler,
    data_iterator: Iterator[dict],
    num_microbatches: int,
    micro_batch_size: int,
    seq_length: int,
    forward_step_func: Callable = gpt_forward_step,
    forward_only: bool = False,
) -> StepResult:
    """One training step with megatron-core's forward-backward schedule.

    model:            list of DDP-wrapped chunks (``TrainingObjects.model``).
    data_iterator:    yields ``num_microbatches`` batch dicts for this rank.
    forward_step_func: ``(data_iterator, model) -> (output, loss_func)`` as the
                      schedule expects; default: GPT forward + masked LM loss.
    forward_only:     run the forward passes only (no grads, no update); used
                      for evaluation and by the STGC two-pass mode.

    Zeroes grad buffers, runs forward+backward on every micro-batch (the grads
    accumulate in the DDP buffers; megatron-core's finalize_model_grads
    reduces them over DP and expert-DP), then clips (--clip-grad), steps the
    optimizer and advances the LR schedule by one step.
    """
    if not forward_only:
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=data_iterator,
        model=model,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    result = StepResult(losses=list(losses), lr=optimizer.param_groups[0]["lr"])
    if forward_only:
        return result
    update_successful, grad_norm, num_zeros = optimizer.step()
    if update_successful:
        scheduler.step(increment=1)
    result.update_successful = bool(update_successful)
    result.grad_norm = None if grad_norm is None else float(grad_norm)
    result.num_zeros_in_grad = num_zeros
    return result
