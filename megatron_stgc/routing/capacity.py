"""--moe-eval-capacity-factor: a different expert capacity whenever the model is in eval mode.

megatron-core reads ``config.moe_expert_capacity_factor`` in every forward (the router's token
dropping, ``TopKRouter.routing``; the alltoall dispatcher's output size). A forward pre-hook on
each MoE layer sets it from the layer's mode (training factor in ``train()``, eval factor in
``eval()``), a forward hook puts the training factor back, so model.eval() and generation get
the eval capacity without the eval code knowing, and an activation recompute inside the
backward (which re-runs the layer's inner function, not the hooked module call) sees the
training factor. The config object is shared by the language model's layers; they all run in
one mode at a time.

Capacity in megatron-core (moe_utils.get_capacity, apply_router_token_dropping): per expert
``ceil(tokens x topk / experts x factor)`` over the router's tokens (this rank's micro-batch
rows), no minimum; pairs over capacity are dropped by lowest probability ("probs") or by
position; the kept pairs keep their weights. DeepSpeed's top2gating (v0.9.5,
sharded_moe.py:157-166, 282, 297-313): ``ceil(tokens / experts x 2 x factor)``, at least
``min_capacity`` (MoE-LLaVA sets 0), the same number; first choices take slots before
second choices, each in token order; after dropping, a token's surviving gate(s) are
renormalised (a token that lost its second expert gives its first weight 1).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_layer import BaseMoELayer


class CapacityBySwitch:
    """The pre/post forward hooks of one MoE layer."""

    def __init__(self, train_factor, eval_factor):
        self.train_factor = train_factor
        self.eval_factor = eval_factor

    def before(self, module, args):
        factor = self.train_factor if module.training else self.eval_factor
        module.config.moe_expert_capacity_factor = factor

    def after(self, module, args, output):
        module.config.moe_expert_capacity_factor = self.train_factor


def install_eval_capacity(model: torch.nn.Module, train_factor, eval_factor) -> int:
    """Hook every MoE layer of ``model``; returns how many were hooked."""
    switch = CapacityBySwitch(train_factor, eval_factor)
    layers = [m for m in model.modules() if isinstance(m, BaseMoELayer)]
    for layer in layers:
        layer.register_forward_pre_hook(switch.before)
        layer.register_forward_hook(switch.after)
    return len(layers)
