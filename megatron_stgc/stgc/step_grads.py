"""The previous step's expert gradients for --stgc-mean-source previous-step.

After megatron's DDP has reduced a step's gradients (finalize_model_grads: expert
parameters all-reduced over expert-DP, summed over all micro-batches), each expert
linear's ``main_grad`` holds the step's mean gradient of that linear. ``remember``
copies it (fp32) into the layer's state before the next step zeroes the buffers; the
next step's backwards compare their tokens with it, with no communication.

Memory: one fp32 copy of the local experts' linear parameters per STGC layer.
Not checkpointed: the first step after a start or a resume has no previous gradient,
nor has a step after a skipped update (its gradient is not trusted); such a step uses
the micro-batch mean (counted as stgc/mean_fallbacks and said once in the log).
"""

from __future__ import annotations

import torch

from megatron_stgc.stgc.capture import LINEAR_NAMES
from megatron_stgc.stgc.mean_source import LinearMean


def _reduced_grad(param: torch.nn.Parameter) -> torch.Tensor:
    """The gradient DDP reduced (main_grad) or, outside megatron's DDP, autograd's .grad."""
    grad = getattr(param, "main_grad", None)
    if grad is None:
        grad = param.grad
    if grad is None:
        raise RuntimeError("STGC previous-step: an expert parameter has no gradient after the "
                           "step (is it frozen?)")
    return grad.detach().float().clone()


def _trainable_bias(linear: torch.nn.Module, suffix: str = ""):
    bias = getattr(linear, f"bias{suffix}", None)
    if isinstance(bias, torch.nn.Parameter) and bias.requires_grad and bias.numel() > 0:
        return bias
    return None


def _linear_means(linear: torch.nn.Module, suffix: str = "") -> LinearMean:
    bias = _trainable_bias(linear, suffix)
    return (_reduced_grad(getattr(linear, f"weight{suffix}")),
            None if bias is None else _reduced_grad(bias))


def reduced_expert_grads(experts: torch.nn.Module) -> list[list[LinearMean]]:
    """(G_W, G_b) per local expert per linear (fc1, fc2), from the parameters' reduced grads.

    SequentialMLP: local_experts[i].linear_fc*; TEGroupedMLP: linear_fc*.weight{i}/bias{i}
    (the grouped form is read from megatron-core's source only; no GPU has run it).
    """
    local_experts = getattr(experts, "local_experts", None)
    if local_experts is not None:
        return [[_linear_means(getattr(mlp, name)) for name in LINEAR_NAMES]
                for mlp in local_experts]
    num_local = experts.num_local_experts
    return [[_linear_means(getattr(experts, name), str(i)) for name in LINEAR_NAMES]
            for i in range(num_local)]
