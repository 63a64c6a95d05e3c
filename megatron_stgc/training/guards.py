"""NaN/inf guard: a step whose gradients or loss are not finite never updates the weights.

``install_nonfinite_guard(model, optimizer, policy)`` wraps this rank's optimizer
``step``: after megatron-core has finished the gradient reduction (the
schedule's ``finalize_model_grads``) and before the optimizer touches any
weight, every rank checks its DDP gradient buffers (dense and expert) for
NaN/inf and the flag is all-reduced over the whole world, so all ranks take
the same decision:

* ``--nan-policy abort``: raise ``NonFiniteError`` (on every rank) naming the
  iteration and what was found;
* ``--nan-policy skip``: return "update not successful" without stepping; the
  training loop counts the step as skipped, the LR schedule does not advance
  and the step's samples count as consumed (as Megatron-LM skips steps).

megatron-core's own per-bucket NaN check (``check_for_nan_in_grad``) raises on
the one rank that sees the NaN, before the collective, which leaves the other
ranks waiting; the guard turns it off and does the collective check instead.

``check_loss(loss, iteration, policy)`` is the loss-side check the loop calls
with the global (all-reduced) loss.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist


class NonFiniteError(RuntimeError):
    """A NaN/inf loss or gradient under --nan-policy abort."""


class NonFiniteGuard:
    """State of the guard on one rank: the policy, the step being run, the skip count."""

    def __init__(self, model: list, optimizer, policy: str):
        if policy not in ("abort", "skip"):
            raise ValueError(f"--nan-policy must be 'abort' or 'skip', got {policy!r}")
        self.model = model
        self.optimizer = optimizer
        self.policy = policy
        self.iteration = 0  # the 1-based iteration being run; set by the loop
        self.skipped_steps = 0
        self.last_step_skipped = False
        self._inner_step = optimizer.step
        optimizer.step = self._guarded_step
        for chunk in model:
            chunk.ddp_config.check_for_nan_in_grad = False

    def remove(self) -> None:
        self.optimizer.step = self._inner_step

    def _grad_buffers(self) -> list[torch.Tensor]:
        return [buffer.grad_data for chunk in self.model
                for buffer in chunk.buffers + chunk.expert_parallel_buffers]

    def gradients_finite(self) -> bool:
        """True when no rank holds a NaN/inf gradient (collective over the world)."""
        bad = any(not bool(torch.isfinite(grad).all()) for grad in self._grad_buffers())
        from megatron_stgc.parallel import collective_device

        flag = torch.tensor([1.0 if bad else 0.0], device=collective_device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() == 0.0

    def _guarded_step(self):
        self.last_step_skipped = False
        if self.gradients_finite():
            return self._inner_step()
        message = (f"iteration {self.iteration}: non-finite gradient (NaN or inf) after the "
                   "backward pass")
        if self.policy == "abort":
            raise NonFiniteError(f"{message}; stopping (--nan-policy abort; "
                                 "--nan-policy skip skips such steps instead)")
        self.skipped_steps += 1
        self.last_step_skipped = True
        if dist.get_rank() == 0:
            print(f"{message}; update skipped (--nan-policy skip), "
                  f"{self.skipped_steps} skipped so far", flush=True)
        return False, None, None

    def check_loss(self, loss: Optional[float]) -> None:
        """Abort on a non-finite global loss under --nan-policy abort; under skip, a
        non-finite loss whose gradients were finite is only reported."""
        if loss is None or math.isfinite(loss):
            return
        message = f"iteration {self.iteration}: non-finite loss ({loss})"
        if self.policy == "abort":
            raise NonFiniteError(f"{message}; stopping (--nan-policy abort)")
        if not self.last_step_skipped and dist.get_rank() == 0:
            print(f"{message} with finite gradients; the update was applied", flush=True)


def install_nonfinite_guard(model: list, optimizer, policy: str) -> NonFiniteGuard:
    return NonFiniteGuard(model, optimizer, policy)
