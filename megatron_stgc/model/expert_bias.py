"""Make biased experts trainable under megatron-core 0.16's local MLP.

With ``add_bias_linear=True`` megatron-core's expert MLP scales the fc2 bias by
the routing probability with ``output += output_bias * per_token_scale``. At
TP=1 ``output`` is a view returned by the tensor-parallel reduce autograd
function, and autograd refuses the in-place add ("Output 0 of
_ReduceFromModelParallelRegion is a view and is being modified inplace").

``install_expert_bias_fix(model)`` registers a forward hook on every local
expert's ``linear_fc2`` that hands back a clone of the output (an ordinary
tensor), so the in-place add is legal. The values and gradients are unchanged.
Only experts whose fc2 returns a bias get the hook.
"""

from __future__ import annotations

import torch

HOOK_ATTR = "_stgc_expert_bias_hook"


def _clone_output_when_biased(module, inputs, output):
    if isinstance(output, tuple) and len(output) == 2 and output[1] is not None:
        return output[0].clone(), output[1]
    return output


def expert_fc2_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The ``linear_fc2`` of every local expert MLP in ``model``."""
    from megatron.core.transformer.moe.experts import SequentialMLP

    modules = []
    for module in model.modules():
        if isinstance(module, SequentialMLP):
            for expert in module.local_experts:
                modules.append(expert.linear_fc2)
    return modules


def install_expert_bias_fix(model: torch.nn.Module) -> int:
    """Hook every local expert's linear_fc2 that has a bias; returns how many were hooked.

    Idempotent: a module already hooked is left alone.
    """
    hooked = 0
    for fc2 in expert_fc2_modules(model):
        if getattr(fc2, "bias", None) is None or hasattr(fc2, HOOK_ATTR):
            continue
        setattr(fc2, HOOK_ATTR, fc2.register_forward_hook(_clone_output_when_biased))
        hooked += 1
    return hooked
