"""Let megatron-core's alltoall dispatcher carry a variable number of experts per token.

Dropless (no --moe-expert-capacity-factor), megatron's alltoall dispatcher sizes its
permutation as tokens x moe_router_topk: 0.17.1 to 0.19.2 cut the permuted rows to that
many (0.16.1 does not use the size), so a tail token's extra pairs would be lost or others'
rows misplaced. With a capacity factor set, the same dispatcher sizes the permutation by the
routing map's own count (``routing_map.sum()``), which is what LTDR needs. So each LTDR
layer's alltoall dispatcher gets its own copy of the config with a capacity factor of
E / k. The dispatcher reads the factor for nothing else (its drop-and-pad mode, the only
other reader, is refused by LTDR); the router, which does the dropping, keeps the layer's
config, so no token is dropped. The allgather dispatcher counts the map already.
Cost on a GPU: the dispatcher's device-to-host copy of the count happens before the
permutation instead of later.
"""

from __future__ import annotations

import copy

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from megatron_stgc.ltdr.router import LTDRRouter


def size_dispatch_by_routing_map(layer: MoELayer) -> bool:
    """Switch a dropless alltoall dispatcher to sizing by the map; True if it changed."""
    dispatcher = layer.token_dispatcher
    config = dispatcher.config
    if not isinstance(dispatcher, MoEAlltoAllTokenDispatcher):
        return False
    if config.moe_expert_capacity_factor is not None:
        return False
    config = copy.copy(config)
    config.moe_expert_capacity_factor = config.num_moe_experts / config.moe_router_topk
    dispatcher.config = config
    return True


def ltdr_layers(model):
    """The MoE layers of ``model`` (a module or a list of chunks) whose router is LTDR's."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, MoELayer) and isinstance(module.router, LTDRRouter):
                yield module


def prepare_ltdr_layers(model) -> int:
    """Make every LTDR layer's dispatcher take tail tokens' extra pairs; returns the count
    of LTDR layers (0 means --ltdr reached nothing: the caller raises)."""
    layers = list(ltdr_layers(model))
    for layer in layers:
        if layer.router.ltdr_config.tail_routing:
            size_dispatch_by_routing_map(layer)
    return len(layers)
