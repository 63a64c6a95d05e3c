"""CPU guards for what would go wrong in STGC's first GPU run (real megatron-core layers).

* captures (inputs, output gradients, weight-gradient copies) are released after each
  backward, not held until the next one;
* under FP8 megatron pads each expert's rows to a multiple of 16 inside SequentialMLP's
  forward: STGC gives the same cosines as without padding;
* the expert-DP group the mean gradient is all-reduced over is megatron's, whatever the
  experts class (TEGroupedMLP has no ``dp_group`` attribute);
* modes whose L_token scaling is not implemented are errors, not silently wrong.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import weakref

import pytest
import torch
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.transformer.moe.experts import SequentialMLP

from megatron_stgc.mcore_compat import build_moe_layer, moe_spec_parts, rebuild_moe_spec
from megatron_stgc.stgc.layer import STGCMoELayer
from megatron_stgc.stgc.spec import stgc_moe_spec
from stgc_utils import STGCConfig, build_stgc_layer, init_single_process, moe_config


def _batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(64, 4, 16, generator=gen), torch.randn(64, 4, 16, generator=gen)


def test_captures_are_released_after_each_backward():
    init_single_process()
    layer = build_stgc_layer(moe_config(gated_linear_unit=True), STGCConfig(enabled=True))
    hidden, weights = _batch(1)
    out, _ = layer(hidden)
    capture = layer.stgc.current.capture
    assert capture.taps  # the forward captured every expert linear
    watched = [weakref.ref(capture)] + [weakref.ref(tap.inputs) for tap in capture.taps.values()]
    del capture
    (out * weights).sum().backward()
    del out
    gc.collect()
    assert layer.stgc.current.capture is None
    assert [ref() for ref in watched] == [None] * len(watched), "a capture outlived its backward"
    assert layer.stgc.last is not None and layer.stgc.last.conflicts.any()


def _fp8_padded(layer):
    """Let megatron's own SequentialMLP pad every expert's rows as under FP8 (the expert
    linears are local ones, so the arithmetic stays fp32)."""
    config = dataclasses.replace(layer.experts.config)
    config.fp8 = "e4m3"
    layer.experts.config = config
    return layer


def test_fp8_padded_expert_rows_give_the_same_cosines():
    init_single_process()
    config = moe_config(gated_linear_unit=True, add_bias_linear=True)
    plain = build_stgc_layer(config, STGCConfig(enabled=True))
    padded = _fp8_padded(build_stgc_layer(config, STGCConfig(enabled=True)))
    padded.load_state_dict(plain.state_dict())
    rows_seen = []
    handle = padded.experts.local_experts[0].linear_fc1.register_forward_hook(
        lambda module, args, output: rows_seen.append(args[0].shape[0]))
    hidden, weights = _batch(2)
    for layer in (plain, padded):
        out, _ = layer(hidden)
        (out * weights).sum().backward()
    handle.remove()
    assert rows_seen and rows_seen[0] % 16 == 0  # megatron padded expert 0's rows
    assert int(padded.stgc.last.routing_map[:, 0].sum()) % 16 != 0  # ... which needed padding
    a, b = plain.stgc.last, padded.stgc.last
    assert torch.equal(torch.isnan(a.cos), torch.isnan(b.cos))
    judged = ~torch.isnan(a.cos)
    assert torch.allclose(a.cos[judged], b.cos[judged], atol=1e-6, rtol=0)
    assert torch.equal(a.conflicts, b.conflicts) and a.conflicts.any()


class _ExpertsWithoutDpGroup(SequentialMLP):
    """Experts that, like Transformer Engine's TEGroupedMLP, carry no ``dp_group``."""

    def __getattribute__(self, name):
        if name == "dp_group":
            raise AttributeError("dp_group")
        return super().__getattribute__(name)


def _with_experts_class(spec, experts_class):
    parts = moe_spec_parts(spec)
    experts = parts.submodules.experts
    if isinstance(experts, functools.partial):  # 0.18+: a builder
        experts = functools.partial(experts_class, *experts.args, **experts.keywords)
    else:  # up to 0.17: a ModuleSpec
        experts = dataclasses.replace(experts, module=experts_class)
    submodules = dataclasses.replace(parts.submodules, experts=experts)
    return rebuild_moe_spec(parts, parts.layer_class, submodules)


def test_expert_dp_group_is_megatrons_for_every_experts_class():
    from megatron.core import parallel_state

    init_single_process()
    config = moe_config()
    for experts_class in (SequentialMLP, _ExpertsWithoutDpGroup):
        spec = _with_experts_class(get_moe_module_spec(use_te=False, num_experts=4),
                                   experts_class)
        layer = build_moe_layer(stgc_moe_spec(spec, STGCConfig(enabled=True)), config)
        assert isinstance(layer, STGCMoELayer) and type(layer.experts) is experts_class
        assert layer.expert_dp_group is parallel_state.get_expert_data_parallel_group()


@pytest.mark.parametrize("setting,value", [("calculate_per_token_loss", True),
                                           ("moe_pad_expert_input_to_capacity", True)])
def test_modes_without_a_correct_scaling_are_rejected(setting, value):
    init_single_process()
    overrides = {setting: value}
    if setting == "moe_pad_expert_input_to_capacity":
        overrides["moe_expert_capacity_factor"] = 1.0
    with pytest.raises(ValueError, match=f"STGC does not support {setting}"):
        build_stgc_layer(moe_config(**overrides), STGCConfig(enabled=True))


def test_context_parallelism_is_rejected():
    from megatron_stgc.stgc.layer import check_supported

    init_single_process()
    config = moe_config()
    config.context_parallel_size = 2  # what TransformerConfig would carry at CP=2
    with pytest.raises(ValueError, match="context parallelism"):
        check_supported(config)


@pytest.mark.parametrize("setting,value,message", [
    ("moe_token_dispatcher_type", "flex", "token dispatchers"),
    ("cuda_graph_impl", "local", "CUDA graphs"),
])
def test_setups_stgc_cannot_follow_fail_when_the_layer_is_built(setting, value, message):
    from megatron_stgc.stgc.layer import check_supported

    init_single_process()
    config = moe_config()
    setattr(config, setting, value)  # what TransformerConfig would carry (flex needs TE/DeepEP)
    with pytest.raises(ValueError, match=message):
        check_supported(config)


# -- FP8: the mean gradient G comes from the same captures as the per-token gradients ------

def test_weight_grads_are_reused_only_where_they_match_the_captures():
    from types import SimpleNamespace

    from megatron_stgc.stgc.capture import weight_grads_match_captures

    def config(fusion=False, fp8=None, **extra):
        return SimpleNamespace(gradient_accumulation_fusion=fusion, fp8=fp8, **extra)

    assert weight_grads_match_captures(config())
    assert not weight_grads_match_captures(config(fusion=True))
    assert not weight_grads_match_captures(config(fp8="hybrid"))
    assert not weight_grads_match_captures(config(fp8="e4m3"))
    assert not weight_grads_match_captures(config(fp4="nvfp4"))
    assert weight_grads_match_captures(SimpleNamespace(gradient_accumulation_fusion=False))


def _fp8_rounded(grad):
    """dW as an FP8 GEMM leaves it: e4m3 with a per-tensor scale (the emulated error)."""
    scale = grad.abs().amax().clamp(min=1e-30) / 448.0
    return (grad / scale).to(torch.float8_e4m3fn).float() * scale


class _ExpertsWithFp8WeightGrads(SequentialMLP):
    """SequentialMLP whose linears hand autograd an FP8-rounded weight gradient, as
    Transformer Engine's linears do under FP8 (dW from quantized inputs and output grads);
    the hooks are registered before STGC's, so STGC sees what TE would give it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for mlp in self.local_experts:
            for linear in (mlp.linear_fc1, mlp.linear_fc2):
                linear.weight.register_hook(_fp8_rounded)


def _biased_layer(config, experts_class=SequentialMLP):
    from megatron_stgc.model.expert_bias import install_expert_bias_fix

    spec = _with_experts_class(get_moe_module_spec(use_te=False, num_experts=4), experts_class)
    layer = build_moe_layer(stgc_moe_spec(spec, STGCConfig(enabled=True)), config)
    install_expert_bias_fix(layer)
    return layer.train()


def test_fp8_biased_experts_take_the_mean_gradient_from_the_captures():
    """With FP8 on, STGC's cosines do not see TE's FP8 weight gradient (emulated): they equal
    those of exact weight gradients. Reusing it (FP8 off, same emulated error) changes them."""
    init_single_process()
    config = moe_config(gated_linear_unit=True, add_bias_linear=True)
    exact = build_stgc_layer(config, STGCConfig(enabled=True))
    hidden, weights = _batch(3)
    out, _ = exact(hidden)
    (out * weights).sum().backward()
    reference = exact.stgc.last.cos
    judged = ~torch.isnan(reference)
    errors = {}
    for fp8 in ("hybrid", None):
        quantized_config = dataclasses.replace(config)
        quantized_config.fp8 = fp8
        layer = _biased_layer(quantized_config, _ExpertsWithFp8WeightGrads)
        layer.load_state_dict(exact.state_dict())
        out, _ = layer(hidden)
        (out * weights).sum().backward()
        cos = layer.stgc.last.cos
        assert torch.equal(torch.isnan(cos), ~judged)
        errors[fp8] = float((cos[judged] - reference[judged]).abs().max())
    assert errors["hybrid"] < 1e-5, errors  # G from the captures
    assert errors[None] > 1e-4, errors  # the emulated FP8 dW reused as G: the test can fail
