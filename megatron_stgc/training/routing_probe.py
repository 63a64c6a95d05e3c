"""A fixed probe batch run through the model now and then: which experts each router picks.

``RoutingProbe.run()`` sends the same micro-batches (this rank's micro-batches of the run's
first step, made once at start) through the model in eval mode without gradients, and a
forward hook on every megatron-core ``TopKRouter`` reads, per token: its top-k expert set
(from the router's own logits, ``router.gating(input)``; sigmoid scores for a sigmoid
router, plus megatron's expert bias when one is enabled: the choice before capacity
dropping, LTDR's tail routing or Gumbel noise) and the entropy of ``softmax(logits)``.
It returns per MoE layer and token group (all, then each modality of
``expert_load.MODALITY_CODES``) the local sums [tokens whose set changed since the previous
run, tokens compared, entropy sum, tokens]; the caller reduces them over ranks.

What a probe does not touch: training state. Eval mode and no_grad mean no dropout draw, no
Gumbel draw, no balancing loss, no STGC/LTDR record or metric sum; the expert-load counter
is paused; every module's train/eval flag is restored afterwards. A run with the probe and
one without give the same losses (tests/test_routing_stability.py).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from megatron_stgc.mcore_compat import router_padding_mask
from megatron_stgc.training import routing_churn
from megatron_stgc.training.expert_load import MODALITY_CODES, ExpertLoadCounter, _inside_backward
from megatron_stgc.training.forward import gpt_forward_step

COLUMNS = ("changed", "compared", "entropy_sum", "tokens")


def moe_routers(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """{layer_number: router} of every megatron-core TopKRouter in ``model``."""
    from megatron.core.transformer.moe.router import TopKRouter

    return {module.layer_number: module for module in model.modules()
            if isinstance(module, TopKRouter)}


def router_scores(router, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [tokens, E] fp32, the scores top-k is taken on [tokens, E]) of ``hidden``."""
    num_experts = router.config.num_moe_experts
    logits = router.gating(hidden).reshape(-1, num_experts).float()
    scores = torch.sigmoid(logits) if getattr(router, "score_function", "softmax") == "sigmoid" \
        else logits
    bias = getattr(router, "expert_bias", None)
    if bias is not None:
        scores = scores + bias.to(scores)
    return logits, scores


def token_groups(num_tokens: int, padding_mask, modality: Optional[torch.Tensor],
                 groups: int, device) -> torch.Tensor:
    """[tokens, groups] bool: real (non-padding) tokens, then real tokens of each modality."""
    real = torch.ones(num_tokens, dtype=torch.bool, device=device)
    if padding_mask is not None:  # megatron's sense: True = padding
        real = ~padding_mask.reshape(-1).to(device=device, dtype=torch.bool)
    columns = [real]
    for code in MODALITY_CODES[:groups - 1]:
        if modality is None:
            columns.append(torch.zeros_like(real))
        else:
            columns.append(real & (modality.to(device).reshape(-1) == code))
    return torch.stack(columns, dim=1)


@contextlib.contextmanager
def eval_mode(chunks: list[torch.nn.Module]):
    """Every module in eval mode, each one's own flag restored afterwards."""
    flags = [(module, module.training) for chunk in chunks for module in chunk.modules()]
    for chunk in chunks:
        chunk.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


class RoutingProbe:
    """The probe batch, the previous run's top-k sets, and the hooks of one run."""

    def __init__(self, chunks: list[torch.nn.Module], model: torch.nn.Module,
                 batches: list[dict], expert_load: ExpertLoadCounter):
        self.chunks = chunks
        self.routers = moe_routers(model)
        self.layers = sorted(self.routers)
        self.batches = batches
        self.expert_load = expert_load
        self.modality_context = getattr(model, "modality", None)
        self.groups = expert_load.groups()
        self.previous: dict[int, torch.Tensor] = {}  # layer -> [probe tokens, E] bool
        self._seen: dict[int, list] = {}

    def _hook(self, layer: int):
        def observe(router, args, kwargs, output):
            if _inside_backward():
                return
            with torch.no_grad():
                logits, scores = router_scores(router, args[0])
                current = self.modality_context.current if self.modality_context else None
                groups = token_groups(logits.shape[0], router_padding_mask(args, kwargs),
                                      current, self.groups, logits.device)
                self._seen.setdefault(layer, []).append(
                    (routing_churn.topk_map(scores, router.topk),
                     routing_churn.routing_entropy(logits), groups))

        return observe

    def run(self) -> torch.Tensor:
        """Probe once; float64 [layers, groups, len(COLUMNS)] local sums (see the module)."""
        self._seen = {}
        handles = [router.register_forward_hook(self._hook(layer), with_kwargs=True)
                   for layer, router in self.routers.items()]
        paused = self.expert_load.paused
        self.expert_load.paused = True
        try:
            with torch.no_grad(), eval_mode(self.chunks):
                for batch in self.batches:
                    gpt_forward_step(iter([batch]), self.chunks[0])
        finally:
            self.expert_load.paused = paused
            for handle in handles:
                handle.remove()
        return torch.stack([self._layer_sums(layer) for layer in self.layers])

    def _layer_sums(self, layer: int) -> torch.Tensor:
        seen = self._seen.get(layer)
        if not seen:
            raise RuntimeError(f"routing probe: the router of layer {layer} saw no token")
        maps, entropy, groups = (torch.cat(parts) for parts in zip(*seen))
        previous = self.previous.get(layer)
        self.previous[layer] = maps
        if previous is None or previous.shape != maps.shape:
            changed = torch.zeros(groups.shape[1], dtype=torch.float64, device=maps.device)
            compared = torch.zeros_like(changed)
        else:
            changed = routing_churn.group_sums(routing_churn.changed_sets(previous, maps), groups)
            compared = groups.sum(dim=0).to(torch.float64)
        return torch.stack([changed, compared, routing_churn.group_sums(entropy, groups),
                            groups.sum(dim=0).to(torch.float64)], dim=1)
