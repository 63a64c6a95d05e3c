"""Switch STGC on through megatron-core layer specs.

``stgc_moe_spec`` turns a megatron-core MoE layer spec (local or TE backend; a
ModuleSpec up to 0.17, a functools.partial builder from 0.18) into the STGC one of
the same shape: layer STGCMoELayer, router STGCRouter, experts untouched.
``apply_stgc`` does that for the selected layers of a decoder block spec and refuses
to return a block in which ``--stgc`` reaches no layer.
"""

from __future__ import annotations

import copy
from dataclasses import replace

from megatron_stgc.mcore_compat import (
    UnsupportedMegatronCore,
    describe_spec,
    moe_spec_parts,
    rebuild_moe_spec,
    replace_router,
    version_note,
)
from megatron_stgc.stgc.config import STGCConfig
from megatron_stgc.stgc.layer import STGCMoELayer
from megatron_stgc.stgc.router import STGCRouter


class STGCAttachError(ValueError):
    """--stgc (or --stgc-layers) would not reach any MoE layer."""


def stgc_moe_spec(moe_spec, stgc_config: STGCConfig):
    """The STGC version of a megatron-core MoE layer spec."""
    parts = moe_spec_parts(moe_spec)
    if parts is None:
        raise UnsupportedMegatronCore(
            f"expected a MoELayer spec, got {describe_spec(moe_spec)} ({version_note()})"
        )
    submodules = replace_router(parts.submodules, STGCRouter)
    return rebuild_moe_spec(parts, STGCMoELayer, submodules, stgc_config=stgc_config)


def layer_mlp_spec(layer_spec):
    return getattr(getattr(layer_spec, "submodules", None), "mlp", None)


def is_moe_layer_spec(layer_spec) -> bool:
    return moe_spec_parts(layer_mlp_spec(layer_spec)) is not None


def expected_moe_layers(transformer_config) -> set[int]:
    """0-based decoder layers megatron-core makes MoE for this config (moe_layer_freq)."""
    if not transformer_config.num_moe_experts:
        return set()
    freq = transformer_config.moe_layer_freq
    if isinstance(freq, int):
        return {i for i in range(transformer_config.num_layers) if i % freq == 0}
    return {i for i, is_moe in enumerate(freq) if is_moe}


def apply_stgc(block_spec, transformer_config, stgc_config: STGCConfig, layer_offset: int = 0):
    """Return a copy of a TransformerBlockSubmodules with STGC on its selected MoE layers.

    layer_offset: global index of block_spec.layer_specs[0] (pipeline stages > 0).
    Raises STGCAttachError when STGC would reach no layer (or --stgc-layers names a
    layer that is not a MoE layer), UnsupportedMegatronCore when megatron-core made a
    MoE layer whose spec this package cannot read.
    """
    stgc_config.validate()
    selected = stgc_config.layer_set(transformer_config.num_layers)
    block_spec = copy.copy(block_spec)
    new_specs, attached, unreadable = [], [], []
    expected_moe = expected_moe_layers(transformer_config)
    for local_index, layer_spec in enumerate(block_spec.layer_specs):
        index = layer_offset + local_index
        if index in selected and is_moe_layer_spec(layer_spec):
            mlp = stgc_moe_spec(layer_mlp_spec(layer_spec), stgc_config)
            layer_spec = replace(layer_spec, submodules=replace(layer_spec.submodules, mlp=mlp))
            attached.append(index)
        elif index in selected and index in expected_moe:
            unreadable.append((index, describe_spec(layer_mlp_spec(layer_spec))))
        elif index in selected and stgc_config.layers_named:
            raise STGCAttachError(f"--stgc-layers names layer {index}, which is not a MoE layer")
        new_specs.append(layer_spec)
    if unreadable:
        raise UnsupportedMegatronCore(
            f"--stgc: megatron-core made MoE layers {[i for i, _ in unreadable]} from specs this "
            f"package cannot read ({unreadable[0][1]}); {version_note()}"
        )
    if not attached:
        moe = sorted(expected_moe) or "none (--num-experts not set)"
        raise STGCAttachError(
            f"--stgc is on but attaches to no layer: --stgc-layers selects "
            f"{stgc_config.layers or 'all'}, MoE layers are {moe}"
        )
    block_spec.layer_specs = new_specs
    return block_spec
