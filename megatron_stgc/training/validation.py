"""Validation loss during training: Megatron-LM's --eval-interval, --eval-iters, --valid-data-path.

Megatron-LM (megatron/training/training.py at NVIDIA/Megatron-LM d98e8a6: the train loop's
"Evaluation." block, line 4915; ``evaluate``, lines 5096-5294; the end-of-training call,
lines 2077-2100) evaluates every ``--eval-interval`` iterations and once more when training
ends: ``--eval-iters`` global batches (``--global-batch-size``) of validation data, forward
only, in eval mode and without gradients, the LM loss summed over tokens and data-parallel
ranks and divided by the token count; perplexity ``exp(min(20, loss))``. Its validation
iterator goes on where the previous evaluation stopped (and restarts after a resume at
``iteration // eval_interval * eval_iters`` global batches, training.py lines 5484-5492).

The same here, with these choices:

* evaluation number ``k`` (0-based, counted from the run's start) reads validation global
  batches ``[k * eval_iters, (k + 1) * eval_iters)``; global batch ``g`` holds run positions
  ``[g*GBS, (g+1)*GBS)`` of the validation records in the data set's seeded order, wrapping
  into a new epoch when they run out (data/dataset.py, data/sample_order.py). ``k`` follows
  from the iteration alone (``(iteration - 1) // eval_interval``), so a resumed run reads the
  batches an uninterrupted one would, and the checkpoint needs no validation state;
* the end-of-training evaluation is skipped when the last iteration was just evaluated
  (Megatron-LM would evaluate twice, on different batches); a run stopped by
  --exit-interval before --train-iters is not at its end and gets none (as Megatron-LM);
* batches are made in the training process (no --num-workers), one step's micro-batches at
  a time.

What validation does not touch: training state. The model is in eval mode (no dropout, no
Gumbel draw, --moe-eval-capacity-factor) under ``torch.no_grad``, so megatron-core's router
tracks no balancing loss and STGC records nothing (stgc/record.py begins a record only in
training with gradients on), and LTDR's router keeps its modality mask only in training
(ltdr/router.py); the expert-load counter is paused; every module's train/eval flag is
restored afterwards (routing_probe.eval_mode). A run with --eval-interval and one without
give the same training values (tests/test_validation.py, with STGC).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_stgc import parallel
from megatron_stgc.config import RunConfig
from megatron_stgc.data.loader import BatchStream
from megatron_stgc.training.expert_load import ExpertLoadCounter
from megatron_stgc.training.routing_probe import eval_mode
from megatron_stgc.training.setup import TrainingObjects
from megatron_stgc.training.step import train_step

PPL_CAP = 20.0  # Megatron-LM logs exp(min(20, loss)) as the perplexity


def first_global_batch(config: RunConfig, iteration: int) -> int:
    """The validation global batch the evaluation after ``iteration`` (1-based) starts at:
    evaluations before it x --eval-iters."""
    t = config.training
    before = (iteration - 1) // t.eval_interval if t.eval_interval else 0
    return before * t.eval_iters


class Validation:
    """When to validate, and one validation run over this rank's share of the batches."""

    def __init__(self, config: RunConfig, objects: TrainingObjects, dataset,
                 expert_load: ExpertLoadCounter, num_microbatches: int):
        self.config = config
        self.objects = objects
        self.dataset = dataset
        self.expert_load = expert_load
        self.num_microbatches = num_microbatches

    def due(self, iteration: int) -> bool:
        """Whether validation runs after ``iteration`` (1-based, just finished)."""
        t = self.config.training
        periodic = bool(t.eval_interval) and iteration % t.eval_interval == 0
        return periodic or iteration == t.train_iters

    def run(self, iteration: int) -> dict[str, Any]:
        """Validate after ``iteration``; the valid/* log values (collective over all ranks)."""
        started = time.perf_counter()
        totals = self._loss_sums(first_global_batch(self.config, iteration))  # float64 [2]
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        loss_sum, tokens = totals.tolist()
        loss = loss_sum / max(tokens, 1.0)
        return {"valid/lm_loss": loss, "valid/ppl": math.exp(min(PPL_CAP, loss)),
                "valid/tokens": int(tokens),
                "valid/samples": self.config.training.eval_iters
                * self.config.training.global_batch_size,
                "valid/time_s": time.perf_counter() - started}

    def _loss_sums(self, first: int) -> torch.Tensor:
        """This rank's [masked LM loss sum, masked tokens] over --eval-iters global batches
        from validation global batch ``first`` (forward only, eval mode, no gradients)."""
        t = self.config.training
        stream = BatchStream(self.dataset, t.global_batch_size, t.micro_batch_size,
                             parallel_state.get_data_parallel_rank(),
                             parallel_state.get_data_parallel_world_size(),
                             start_step=first, end_step=first + t.eval_iters)
        totals = torch.zeros(2, dtype=torch.float64, device=parallel.collective_device())
        paused, self.expert_load.paused = self.expert_load.paused, True
        try:
            with torch.no_grad(), eval_mode(self.objects.model):
                for _ in range(t.eval_iters):
                    result = train_step(self.objects.model, self.objects.optimizer,
                                        self.objects.scheduler, stream.next_step(),
                                        self.num_microbatches, t.micro_batch_size,
                                        self.config.model.seq_length, forward_only=True)
                    for micro_batch in result.losses:  # {"lm_loss": [sum, tokens], ...}
                        totals += micro_batch["lm_loss"].detach().to(totals)
        finally:
            self.expert_load.paused = paused
            stream.close()
        return totals
