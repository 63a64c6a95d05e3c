"""STGC against megatron-core's own MoE layer, the two-pass reference, accumulation, recompute."""

import pytest
import torch
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron_stgc.mcore_compat import build_moe_layer

from megatron_stgc.stgc.record import APPLY, IDENTIFY
from megatron_stgc.stgc.two_pass import stgc_mode, two_pass_forward_backward, zero_module_grads
from stgc_utils import STGCConfig, build_stgc_layer, init_single_process, moe_config


def _batch(seed, seq=64, batch=4, hidden=16):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(seq, batch, hidden, generator=gen), torch.randn(seq, batch, hidden, generator=gen)


def _backward(layer, hidden, weights, scale=1.0):
    out, _ = layer(hidden)
    ((out * weights).sum() * scale / out[..., 0].numel()).backward()


def _grads(layer):
    return {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}


def _assert_same_grads(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=0), name


def test_beta_zero_gives_stock_megatron_gradients():
    init_single_process()
    config = moe_config(moe_aux_loss_coeff=0.01, gated_linear_unit=True)
    stgc = build_stgc_layer(config, STGCConfig(enabled=True, beta=0.0))
    stock = build_moe_layer(get_moe_module_spec(use_te=False, num_experts=4), config,
                            layer_number=1)
    stock.load_state_dict(stgc.state_dict())
    stock.train()
    hidden, weights = _batch(0)
    _backward(stgc, hidden, weights)
    _backward(stock, hidden, weights)
    assert stgc.stgc.last.conflicts.any()  # conflicts were found, and weighted by 0
    _assert_same_grads(_grads(stgc), _grads(stock))

    # ... and beta > 0 changes only the router's gradient.
    on = build_stgc_layer(config, STGCConfig(enabled=True, beta=1.0))
    on.load_state_dict(stgc.state_dict())
    _backward(on, hidden, weights)
    for name, grad in _grads(on).items():
        same = torch.equal(grad, _grads(stock)[name])
        assert same != name.startswith("router."), name


@pytest.mark.parametrize("push", ["paper", "centered", "centered-logit"])
def test_single_pass_equals_two_pass(push):
    """Also with tokens that get no gradient (as loss-masked tokens at the top MoE layer):
    their pairs have no cosine, are not judged, and the centered pushes weigh them 0 in
    both modes."""
    init_single_process()
    config = moe_config(gated_linear_unit=True, add_bias_linear=True)
    single = build_stgc_layer(config, STGCConfig(enabled=True, push=push))
    two = build_stgc_layer(config, STGCConfig(enabled=True, mode="two-pass", push=push))
    two.load_state_dict(single.state_dict())
    batches = [_batch(1), _batch(2)]  # two micro-batches in the step
    for _, weights in batches:
        weights[:16] = 0.0  # the first 16 positions of every sample get no gradient
    for hidden, weights in batches:
        _backward(single, hidden, weights, scale=0.5)

    def forward_backward():
        for hidden, weights in batches:
            _backward(two, hidden, weights, scale=0.5)

    two_pass_forward_backward(two, forward_backward, lambda: zero_module_grads(two))
    undefined = single.stgc.last.cos.isnan() & single.stgc.last.routing_map
    assert undefined.any()  # routed pairs without a cosine are in the test
    assert torch.equal(single.stgc.last.conflicts, two.stgc.last.conflicts)
    _assert_same_grads(_grads(single), _grads(two), atol=1e-7)


def test_identify_pass_changes_no_gradient():
    init_single_process()
    config = moe_config()
    layer = build_stgc_layer(config, STGCConfig(enabled=True))
    stock = build_moe_layer(get_moe_module_spec(use_te=False, num_experts=4), config,
                            layer_number=1)
    stock.load_state_dict(layer.state_dict())
    hidden, weights = _batch(3)
    with stgc_mode(layer, IDENTIFY):
        _backward(layer, hidden, weights)
    _backward(stock, hidden, weights)
    _assert_same_grads(_grads(layer), _grads(stock))
    assert len(layer.stgc.identified) == 1
    with stgc_mode(layer, APPLY):  # the queue feeds exactly one apply forward
        layer(hidden)


def test_accumulation_with_micro_batches_in_flight():
    """Two micro-batches, forwards first then backwards in reverse (as a pipeline does),
    with megatron-core's 1/num_micro_batches loss scale: router gradient = sum of the
    two micro-batches' separate gradients."""
    init_single_process()
    config = moe_config(gated_linear_unit=True)
    layer = build_stgc_layer(config, STGCConfig(enabled=True))
    batches = [_batch(4), _batch(5)]
    try:
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(0.5))
        separate = []
        for hidden, weights in batches:
            layer.zero_grad()
            _backward(layer, hidden, weights, scale=0.5)
            separate.append(layer.router.weight.grad.clone())

        layer.zero_grad()
        losses = []
        for hidden, weights in batches:
            out, _ = layer(hidden)
            losses.append((out * weights).sum() * 0.5 / out[..., 0].numel())
        for loss in reversed(losses):
            loss.backward()
        accumulated = layer.router.weight.grad
    finally:
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    assert torch.allclose(accumulated, separate[0] + separate[1], atol=1e-7)

    # The scale reaches L_token: a different scale gives a different router gradient.
    layer.zero_grad()
    _backward(layer, *batches[0], scale=0.5)
    assert not torch.allclose(layer.router.weight.grad, separate[0], atol=1e-7)


def test_activation_recompute_gives_same_flags_and_gradients():
    init_single_process()
    plain_cfg = moe_config(gated_linear_unit=True)
    recompute_cfg = moe_config(gated_linear_unit=True, recompute_granularity="selective",
                               recompute_modules=["moe"])
    plain = build_stgc_layer(plain_cfg, STGCConfig(enabled=True))
    recompute = build_stgc_layer(recompute_cfg, STGCConfig(enabled=True))
    recompute.load_state_dict(plain.state_dict())
    assert recompute.moe_layer_recompute
    hidden, weights = _batch(6)
    _backward(plain, hidden, weights)
    _backward(recompute, hidden.clone().requires_grad_(True), weights)
    assert torch.equal(plain.stgc.last.conflicts, recompute.stgc.last.conflicts)
    _assert_same_grads(_grads(plain), _grads(recompute), atol=1e-7)
