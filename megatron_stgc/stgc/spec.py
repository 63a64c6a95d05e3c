"""Switch STGC on through megatron-core layer specs.

``stgc_moe_spec`` turns a megatron-core MoE ModuleSpec (local or TE backend) into
the STGC one: module STGCMoELayer, router STGCRouter, experts untouched.
``apply_stgc`` does that for the selected layers of a decoder block spec.
"""

from __future__ import annotations

import copy
from dataclasses import replace

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_stgc.stgc.config import STGCConfig
from megatron_stgc.stgc.layer import STGCMoELayer
from megatron_stgc.stgc.router import STGCRouter


def stgc_moe_spec(moe_spec: ModuleSpec, stgc_config: STGCConfig) -> ModuleSpec:
    """The STGC version of a megatron-core MoE layer spec."""
    if not (isinstance(moe_spec.module, type) and issubclass(moe_spec.module, MoELayer)):
        raise TypeError(f"expected a MoELayer spec, got module {moe_spec.module!r}")
    submodules = replace(moe_spec.submodules, router=STGCRouter)
    params = dict(moe_spec.params or {}, stgc_config=stgc_config)
    return replace(moe_spec, module=STGCMoELayer, submodules=submodules, params=params)


def is_moe_layer_spec(layer_spec: ModuleSpec) -> bool:
    mlp = getattr(layer_spec.submodules, "mlp", None)
    return (
        isinstance(mlp, ModuleSpec)
        and isinstance(mlp.module, type)
        and issubclass(mlp.module, MoELayer)
    )


def apply_stgc(block_spec, transformer_config, stgc_config: STGCConfig, layer_offset: int = 0):
    """Return a copy of a TransformerBlockSubmodules with STGC on its selected MoE layers.

    layer_offset: global index of block_spec.layer_specs[0] (pipeline stages > 0).
    Layers named in --stgc-layers that are not MoE layers are an error.
    """
    stgc_config.validate()
    selected = stgc_config.layer_set(transformer_config.num_layers)
    block_spec = copy.copy(block_spec)
    new_specs = []
    for local_index, layer_spec in enumerate(block_spec.layer_specs):
        index = layer_offset + local_index
        if index in selected and is_moe_layer_spec(layer_spec):
            mlp = stgc_moe_spec(layer_spec.submodules.mlp, stgc_config)
            layer_spec = replace(layer_spec, submodules=replace(layer_spec.submodules, mlp=mlp))
        elif index in selected and stgc_config.layers is not None:
            raise ValueError(f"--stgc-layers names layer {index}, which is not a MoE layer")
        new_specs.append(layer_spec)
    block_spec.layer_specs = new_specs
    return block_spec
