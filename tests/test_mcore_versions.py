"""megatron-core versions: the STGC spec on each supported release, and --stgc never silently off.

Runs on every CI lane (0.16.1 and 0.19.2; 0.17.1 and 0.18.2 in the spec lane): the spec shape
each release uses is recognised, a block in which --stgc reaches no layer is an error, and
megatron's MoE metric tracker receives stgc_token_loss.
"""

import pytest
import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_stgc.mcore_compat import (
    TESTED_VERSIONS,
    VERSION,
    UnsupportedMegatronCore,
    moe_spec_parts,
    record_moe_metric,
    report_moe_metrics,
)
from megatron_stgc.stgc.layer import STGCMoELayer
from megatron_stgc.stgc.router import STGCRouter
from megatron_stgc.stgc.spec import STGCAttachError, apply_stgc, stgc_moe_spec
from stgc_utils import STGCConfig, init_single_process, moe_config


def test_this_lane_runs_a_version_ci_claims():
    assert VERSION in TESTED_VERSIONS


def test_stgc_spec_keeps_the_release_spec_shape():
    stock = get_moe_module_spec(use_te=False, num_experts=4)
    stgc = stgc_moe_spec(stock, STGCConfig(enabled=True, beta=0.5))
    assert type(stgc) is type(stock)  # ModuleSpec up to 0.17, functools.partial from 0.18
    stock_parts, parts = moe_spec_parts(stock), moe_spec_parts(stgc)
    assert stock_parts.layer_class is MoELayer and parts.layer_class is STGCMoELayer
    assert parts.submodules.router is STGCRouter
    assert parts.submodules.experts is stock_parts.submodules.experts
    assert parts.params["stgc_config"].beta == 0.5


def _block(num_layers=4, moe_layer_freq=2):
    config = moe_config(num_layers=num_layers, moe_layer_freq=moe_layer_freq)
    return config, get_gpt_decoder_block_spec(config, use_transformer_engine=False,
                                              normalization="LayerNorm")


def _stgc_indices(block):
    return [i for i, spec in enumerate(block.layer_specs)
            if getattr(moe_spec_parts(spec.submodules.mlp), "layer_class", None) is STGCMoELayer]


def test_apply_stgc_reaches_the_moe_layers_only():
    init_single_process()
    config, block = _block()
    assert _stgc_indices(apply_stgc(block, config, STGCConfig(enabled=True))) == [0, 2]
    assert _stgc_indices(apply_stgc(block, config, STGCConfig(enabled=True, layers="2"))) == [2]
    # "all" is every MoE layer, like no --stgc-layers (dense layers are skipped, not an error)
    assert _stgc_indices(apply_stgc(block, config, STGCConfig(enabled=True, layers="all"))) == [0, 2]


def test_stgc_layers_naming_a_dense_layer_is_an_error():
    init_single_process()
    config, block = _block()
    with pytest.raises(STGCAttachError, match="names layer 1, which is not a MoE layer"):
        apply_stgc(block, config, STGCConfig(enabled=True, layers="1"))


def test_stgc_reaching_no_layer_is_an_error():
    """A block whose layers are all dense (e.g. the MoE layers were swapped out): --stgc is
    not silently off."""
    init_single_process()
    dense_config = moe_config(num_layers=4, num_moe_experts=None)
    dense = get_gpt_decoder_block_spec(dense_config, use_transformer_engine=False,
                                       normalization="LayerNorm")
    with pytest.raises(STGCAttachError, match="attaches to no layer"):
        apply_stgc(dense, dense_config, STGCConfig(enabled=True))


def test_a_moe_spec_of_unknown_shape_is_reported_as_unsupported_megatron_core():
    """A future release that wraps MoE layers in a shape this package cannot read."""
    from dataclasses import replace

    init_single_process()
    config, block = _block()

    def wrapped_builder(**kwargs):  # not a ModuleSpec, not a partial of MoELayer
        raise AssertionError("never built")

    block.layer_specs = [
        replace(spec, submodules=replace(spec.submodules, mlp=wrapped_builder))
        if moe_spec_parts(spec.submodules.mlp) else spec
        for spec in block.layer_specs
    ]
    with pytest.raises(UnsupportedMegatronCore, match=r"MoE layers \[0, 2\].*megatron-core"):
        apply_stgc(block, config, STGCConfig(enabled=True))


def test_a_built_model_without_stgc_layers_is_an_error():
    from megatron_stgc.model.gpt import check_stgc_attached

    init_single_process()
    layer = MoELayer.__new__(MoELayer)  # no STGCMoELayer anywhere in this module
    torch.nn.Module.__init__(layer)
    with pytest.raises(UnsupportedMegatronCore, match="no STGC layer"):
        check_stgc_attached(layer)


def test_stgc_token_loss_reaches_megatrons_moe_tracker():
    init_single_process()
    from stgc_utils import forget_tracked_moe_metric

    forget_tracked_moe_metric("stgc_token_loss")  # test_ltdr sized it for 1 layer
    record_moe_metric("stgc_token_loss", torch.tensor(0.3), layer_number=1, num_layers=4)
    record_moe_metric("stgc_token_loss", torch.tensor(0.5), layer_number=3, num_layers=4)
    reported = report_moe_metrics(loss_scale=1.0, num_layers=4, moe_layer_freq=2)
    assert reported["stgc_token_loss"] == pytest.approx((0.3 + 0.5) / 2)  # mean over MoE layers
    assert report_moe_metrics(loss_scale=1.0, num_layers=4, moe_layer_freq=2).get(
        "stgc_token_loss", 0.0) == 0.0  # reported once, then cleared
