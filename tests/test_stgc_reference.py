"""The stored STGC reference (tests/fixtures/stgc_reference.pt) that every megatron-core lane
must reproduce: fixed weights and batch, expected cosines, flags and router-gradient change
computed once by the slow oracle (tests/fixtures/make_stgc_reference.py). If the STGC math
or megatron-core's MoE forward drifts between versions, this fails on the drifting lane."""

import os

import pytest
import torch

from megatron_stgc.mcore_compat import VERSION
from stgc_utils import STGCConfig, build_stgc_layer, init_single_process, moe_config

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "stgc_reference.pt")


@pytest.fixture(scope="module")
def reference():
    return torch.load(FIXTURE, weights_only=False)


def _run(reference, beta: float):
    """One forward + backward of the reference batch; (STGC report, router weight grad)."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    init_single_process()
    # no schedule ran: main-loss scale 1 (one micro-batch, no fp16 loss scale); earlier tests
    # in this process may have left a scale of another shape, so reset rather than copy into it
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    layer = build_stgc_layer(moe_config(**reference["config"]),
                             STGCConfig(enabled=True, tau=reference["tau"], beta=beta))
    params = dict(layer.named_parameters())
    assert set(params) == set(reference["weights"]), (
        f"megatron-core {VERSION} names the layer's parameters differently: "
        f"{sorted(set(params) ^ set(reference['weights']))}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(reference["weights"][name])
    out, _ = layer(reference["hidden"])
    # the mean over tokens keeps the main-loss part of the router gradient small, so that
    # fp32 noise in it does not hide the (beta) change; cosines do not depend on the scale
    num_tokens = out.shape[0] * out.shape[1]
    ((out * reference["loss_weights"]).sum() / num_tokens).backward()
    return layer.stgc.last, layer.router.weight.grad.double()


def test_cosines_and_flags_match_the_stored_oracle(reference):
    report, _ = _run(reference, beta=reference["beta"])
    assert torch.equal(report.routing_map, reference["routing_map"])
    expected = reference["cos"]
    judged = ~torch.isnan(expected)
    assert torch.equal(torch.isnan(report.cos), ~judged)
    assert (report.cos.double()[judged] - expected[judged]).abs().max() < 1e-5
    assert torch.equal(report.conflicts, reference["conflicts"])
    assert int(reference["conflicts"].sum()) > 0 and int((judged & ~reference["conflicts"]).sum()) > 0


def test_router_gradient_change_matches_the_stored_oracle(reference):
    _, with_stgc = _run(reference, beta=reference["beta"])
    _, without = _run(reference, beta=0.0)
    change = with_stgc - without
    expected = reference["router_grad_change"]
    assert expected.abs().max() > 1e-4  # the reference change is not trivially zero
    assert torch.allclose(change, expected, atol=1e-6, rtol=1e-4), (change - expected).abs().max()
