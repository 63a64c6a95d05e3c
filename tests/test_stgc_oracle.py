"""STGC's cosines and flags against per-token gradients computed the slow way."""

import pytest
import torch

from stgc_utils import (
    STGCConfig,
    build_stgc_layer,
    init_single_process,
    moe_config,
    oracle_pair_cosines,
)

CASES = [
    # (topk, gated, bias, capacity_factor)
    (2, False, False, None),
    (1, True, False, None),
    (2, True, False, None),
    (2, False, True, None),
    (1, True, True, None),
    (2, True, True, 0.8),  # token dropping
    (1, False, False, 0.6),
]


@pytest.mark.parametrize("topk,gated,bias,capacity", CASES)
def test_cosines_and_flags_match_per_token_gradients(topk, gated, bias, capacity):
    init_single_process()
    config = moe_config(
        moe_router_topk=topk, gated_linear_unit=gated, add_bias_linear=bias,
        moe_expert_capacity_factor=capacity,
    )
    tau = 0.0
    layer = build_stgc_layer(config, STGCConfig(enabled=True, tau=tau))
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(64, 4, 16, generator=gen)  # 256 tokens, ~128 per expert at top-2
    weights = torch.randn(64, 4, 16, generator=gen)

    out, _ = layer(hidden)
    (out * weights).sum().backward()
    report = layer.stgc.last
    expected, routing_map = oracle_pair_cosines(layer, hidden, weights)

    assert torch.equal(report.routing_map, routing_map)
    if capacity is not None:
        assert routing_map.sum() < routing_map.shape[0] * topk  # some pairs were dropped
    # Same pairs judged (NaN = not routed / dropped / zero gradient).
    assert torch.equal(torch.isnan(report.cos), torch.isnan(expected))
    judged = ~torch.isnan(expected)
    assert judged.sum() > 0
    assert torch.allclose(report.cos.double()[judged], expected[judged], atol=1e-5, rtol=0)
    # Flags agree away from the threshold, and both sides of tau are populated.
    clear = judged & ((expected - tau).abs() > 1e-4)
    assert torch.equal(report.conflicts[clear], (expected[clear] < tau))
    assert report.conflicts.any() and (judged & ~report.conflicts).any()
    assert not report.conflicts[~routing_map].any()


def test_padding_tokens_are_not_judged():
    """Tokens whose loss is masked out have zero gradient: never judged, never conflicting."""
    init_single_process()
    layer = build_stgc_layer(moe_config(), STGCConfig(enabled=True))
    gen = torch.Generator().manual_seed(8)
    hidden = torch.randn(64, 4, 16, generator=gen)
    weights = torch.randn(64, 4, 16, generator=gen)
    weights[40:] = 0  # the last 24 positions of every sequence are padding
    out, _ = layer(hidden)
    (out * weights).sum().backward()
    report = layer.stgc.last
    padded = torch.zeros(64, 4, dtype=torch.bool)
    padded[40:] = True
    padded = padded.reshape(-1)
    assert torch.isnan(report.cos[padded]).all()
    assert not report.conflicts[padded].any()
    assert report.conflicts[~padded].any()


def test_bf16_parameters_compute_cosines_in_fp32():
    """BF16 params and activations: STGC's arithmetic runs in fp32 on the captured
    bf16 factors; cosines track the fp32 per-token oracle on the same bf16 weights."""
    init_single_process()
    config = moe_config(bf16=True, params_dtype=torch.bfloat16, gated_linear_unit=True)
    layer = build_stgc_layer(config, STGCConfig(enabled=True))
    assert layer.experts.local_experts[0].linear_fc1.weight.dtype == torch.bfloat16
    gen = torch.Generator().manual_seed(9)
    hidden = torch.randn(64, 4, 16, generator=gen).bfloat16()
    weights = torch.randn(64, 4, 16, generator=gen).bfloat16()
    out, _ = layer(hidden)
    (out.float() * weights.float()).sum().backward()
    report = layer.stgc.last
    assert report.cos.dtype == torch.float32
    expected, _ = oracle_pair_cosines(layer, hidden, weights)
    judged = ~torch.isnan(expected)
    assert torch.equal(torch.isnan(report.cos), ~judged)
    assert (report.cos.double()[judged] - expected[judged]).abs().max() < 0.05
    clear = judged & ((expected).abs() > 0.05)
    assert torch.equal(report.conflicts[clear], expected[clear] < 0)


def test_expert_with_no_tokens():
    """An expert that receives no token this micro-batch is simply absent from the flags."""
    init_single_process()
    layer = build_stgc_layer(moe_config(), STGCConfig(enabled=True))
    with torch.no_grad():
        layer.router.weight[3] = -5.0  # positive inputs never pick expert 3
    hidden = torch.rand(16, 4, 16, generator=torch.Generator().manual_seed(10)) + 0.5
    out, _ = layer(hidden)
    out.sum().backward()
    report = layer.stgc.last
    assert not report.routing_map[:, 3].any()
    assert torch.isnan(report.cos[:, 3]).all() and not report.conflicts[:, 3].any()
    assert (~torch.isnan(report.cos[:, :3])).sum() == report.routing_map[:, :3].sum()
