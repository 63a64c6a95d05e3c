"""Switch LTDR on through megatron-core layer specs (after STGC, if that is on).

Every MoE layer's router becomes ``LTDRRouter``, or ``STGCLTDRRouter`` where the STGC spec
already put ``STGCRouter`` there; the layer class and the experts are untouched. The router
gets its LTDRConfig through ``functools.partial`` (megatron-core builds the router as
``submodules.router(config=..., pg_collection=..., ...)`` in every supported release).
"""

from __future__ import annotations

import functools

from megatron_stgc.ltdr.config import LTDRConfig
from megatron_stgc.ltdr.router import LTDRRouter, STGCLTDRRouter
from megatron_stgc.mcore_compat import moe_spec_parts, rebuild_moe_spec, replace_router
from megatron_stgc.plugin import map_moe_layer_specs
from megatron_stgc.stgc.router import STGCRouter
from megatron_stgc.stgc.spec import STGCAttachError


class LTDRAttachError(STGCAttachError):
    """--ltdr would not reach any MoE layer."""


def ltdr_router_class(current_router) -> type:
    """The LTDR router class to use in place of ``current_router`` (a class)."""
    if isinstance(current_router, type) and issubclass(current_router, STGCRouter):
        return STGCLTDRRouter
    return LTDRRouter


def ltdr_moe_spec(moe_spec, ltdr_config: LTDRConfig):
    """The LTDR version of a megatron-core MoE layer spec, or None if it is not one."""
    parts = moe_spec_parts(moe_spec)
    if parts is None:
        return None
    router = functools.partial(ltdr_router_class(parts.submodules.router),
                               ltdr_config=ltdr_config)
    submodules = replace_router(parts.submodules, router)
    return rebuild_moe_spec(parts, parts.layer_class, submodules)


def apply_ltdr(block_spec, ltdr_config: LTDRConfig):
    """A copy of a TransformerBlockSubmodules with LTDR on every MoE layer."""
    return map_moe_layer_specs(
        block_spec, lambda mlp: ltdr_moe_spec(mlp, ltdr_config),
        LTDRAttachError("--ltdr is on but the model has no MoE layer (set --num-experts)"))
