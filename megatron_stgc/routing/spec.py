"""Attach the Gumbel-sampled second expert through megatron-core's layer spec.

Every MoE layer's router builder (megatron's TopKRouter, or the STGC / LTDR / STGC+LTDR router
the other plug-ins put there) is wrapped by ``build_gumbel_router``: it builds that router
unchanged and puts a ``GumbelSecondExpert`` in its top-k selection slot. No router class per
combination: STGC and LTDR subclass ``TopKRouter.routing`` and call it, and the selection
happens inside it, so
* STGC judges (and pushes away from) the pairs the sampled routing chose;
* LTDR's top-k tokens use the sampled routing too; its tail tokens are re-routed to their
  deterministic top-a (``topk_routing_with_score_function`` without the slot): a tail token
  is one whose routing is too flat to trust a second choice, and with the default a = E
  every expert is taken anyway.
Apply it last (after STGC and LTDR have chosen their router classes).
"""

from __future__ import annotations

import functools

from megatron_stgc.mcore_compat import install_topk_selection, moe_spec_parts, rebuild_moe_spec
from megatron_stgc.mcore_compat import replace_router
from megatron_stgc.plugin import map_moe_layer_specs
from megatron_stgc.routing.gumbel import GumbelSecondExpert
from megatron_stgc.stgc.spec import STGCAttachError


def build_gumbel_router(*args, router_builder, seed: int, **kwargs):
    """megatron's router builder call, then the Gumbel top-k selection installed."""
    router = router_builder(*args, **kwargs)
    install_topk_selection(router, GumbelSecondExpert(router, seed))
    return router


def gumbel_moe_spec(moe_spec, seed: int):
    """The MoE layer spec with its router wrapped, or None if it is not a MoE layer spec."""
    parts = moe_spec_parts(moe_spec)
    if parts is None:
        return None
    router = functools.partial(build_gumbel_router, router_builder=parts.submodules.router,
                               seed=seed)
    return rebuild_moe_spec(parts, parts.layer_class, replace_router(parts.submodules, router))


def apply_gumbel_second_expert(block_spec, seed: int):
    """A copy of a TransformerBlockSubmodules whose MoE routers sample the second expert."""
    return map_moe_layer_specs(
        block_spec, lambda mlp: gumbel_moe_spec(mlp, seed),
        STGCAttachError("--moe-router-gumbel-second-expert is on but the model has no MoE "
                        "layer (set --num-experts)"))


def gumbel_selections(model) -> list[GumbelSecondExpert]:
    """The Gumbel selections of a built model's routers, in layer order."""
    return [module.router_replay for module in model.modules()
            if isinstance(getattr(module, "router_replay", None), GumbelSecondExpert)]


def set_router_step(model, step: int) -> None:
    """Before a training step: the step the noise is keyed on; the draw count restarts."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        for selection in gumbel_selections(chunk):
            selection.begin_step(step)
