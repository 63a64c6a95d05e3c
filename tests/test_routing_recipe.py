"""MoE-LLaVA's routing recipe on real megatron-core MoE layers (one process):

* --moe-router-gumbel-second-expert: the second expert is distributed as the softmax over
  the remaining experts (Gumbel-max identity, 40,000 draws), the gates are the noise-free
  softmax renormalised over the pair, eval mode is megatron's router exactly, the noise is a
  function of (seed, layer, step, draw) (a fresh router at the same step draws the same),
  activation recompute reuses the forward's choice, STGC judges the sampled pairs;
* --moe-eval-capacity-factor: eval-mode forwards drop with the eval factor, training ones
  with the training factor, each equal to megatron's capacity rule computed by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from megatron_stgc.mcore_compat import build_moe_layer
from megatron_stgc.routing.capacity import install_eval_capacity
from megatron_stgc.routing.gumbel import GumbelSecondExpert
from megatron_stgc.routing.spec import gumbel_moe_spec, gumbel_selections, set_router_step
from megatron_stgc.stgc.spec import stgc_moe_spec
from stgc_utils import STGCConfig, init_single_process, moe_config

E, HIDDEN = 4, 16
LOGITS = [2.0, 1.0, 0.5, -1.0]  # expert 0 first; the second among 1, 2, 3


@pytest.fixture(autouse=True)
def single_process():
    init_single_process()


def _layer(config, gumbel: bool = True, stgc: STGCConfig | None = None, seed: int = 1234):
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    spec = get_moe_module_spec(use_te=False, num_experts=config.num_moe_experts)
    if stgc is not None:
        spec = stgc_moe_spec(spec, stgc)
    if gumbel:
        spec = gumbel_moe_spec(spec, seed=7)
    layer = build_moe_layer(spec, config, layer_number=1)
    layer.set_layer_number(1)
    return layer.train()


def _fixed_logit_input(tokens: int, logits=LOGITS, layer=None) -> torch.Tensor:
    """[tokens, 1, HIDDEN] rows e_0, with the router's column 0 set so every row's logits
    are ``logits``."""
    with torch.no_grad():
        layer.router.weight[:, 0] = torch.tensor(logits)
    x = torch.zeros(tokens, 1, HIDDEN)
    x[:, :, 0] = 1.0
    return x


def test_second_expert_follows_the_softmax_over_the_remaining_experts():
    layer = _layer(moe_config())
    draws = 40_000
    x = _fixed_logit_input(draws, layer=layer)
    probs, routing_map = layer.router(x)
    assert routing_map[:, 0].all() and (routing_map.sum(dim=1) == 2).all()
    counts = routing_map[:, 1:].sum(dim=0).double()
    rest = torch.tensor(LOGITS[1:], dtype=torch.float64)
    expected = torch.softmax(rest, dim=0)  # Gumbel-max: P(e) = softmax over the other experts
    observed = counts / draws
    sigma = torch.sqrt(expected * (1 - expected) / draws)
    assert ((observed - expected).abs() < 5 * sigma).all(), (observed, expected)
    # a deterministic second expert (expert 1 always) or a uniform one would be far off
    assert observed[0] < 0.75 and observed[2] > 0.05
    # gates: noise-free softmax of the two chosen logits (DeepSpeed's renormalised pair)
    second = routing_map[:, 1:].float().argmax(dim=1) + 1
    z1, z2 = torch.tensor(LOGITS[0]), torch.tensor(LOGITS)[second]
    gate1 = torch.exp(z1) / (torch.exp(z1) + torch.exp(z2))
    torch.testing.assert_close(probs[:, 0], gate1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(draws), rtol=1e-5, atol=1e-6)


def test_eval_mode_is_megatrons_router_exactly_and_off_installs_nothing():
    layer = _layer(moe_config())
    plain = _layer(moe_config(), gumbel=False)
    assert plain.router.router_replay is None and not gumbel_selections(plain)
    assert isinstance(layer.router.router_replay, GumbelSecondExpert)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(64, 2, HIDDEN, generator=torch.Generator().manual_seed(3))
    layer.eval(), plain.eval()
    with torch.no_grad():
        got, expected = layer.router(x), plain.router(x)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    # training: the first expert is always megatron's top-1, the second is sampled
    layer.train(), plain.train()
    got, expected = layer.router(x), plain.router(x)
    top1 = lambda probs: probs.argmax(dim=1)  # noqa: E731
    assert torch.equal(top1(got[0]), top1(expected[0]))
    assert not torch.equal(got[1], expected[1])


def test_noise_is_a_function_of_seed_layer_step_and_draw():
    x = torch.randn(256, 2, HIDDEN, generator=torch.Generator().manual_seed(4))
    maps = {}
    for run in ("first", "resumed"):  # a fresh router (as after a resume) at the same step
        layer = _layer(moe_config())
        set_router_step(layer, 5)
        maps[run] = [layer.router(x)[1] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(maps["first"], maps["resumed"]))
    assert not torch.equal(maps["first"][0], maps["first"][1])  # the next draw differs
    set_router_step(layer, 6)
    assert not torch.equal(layer.router(x)[1], maps["first"][0])


def test_activation_recompute_reuses_the_forwards_sampled_routing():
    hidden = torch.randn(32, 2, HIDDEN, generator=torch.Generator().manual_seed(5))
    weights = torch.randn(32, 2, HIDDEN, generator=torch.Generator().manual_seed(6))
    grads = []
    for recompute in (False, True):
        layer = _layer(moe_config(moe_aux_loss_coeff=0.01, moe_layer_recompute=recompute))
        set_router_step(layer, 0)
        out, _ = layer(hidden.clone().requires_grad_(True))
        (out * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in layer.named_parameters()})
        assert not layer.router.router_replay._recompute  # every choice was replayed
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-5, atol=1e-6)


def test_stgc_judges_the_sampled_pairs():
    layer = _layer(moe_config(), stgc=STGCConfig(enabled=True))
    x = torch.randn(128, 2, HIDDEN, generator=torch.Generator().manual_seed(8))
    out, _ = layer(x.requires_grad_(True))
    out.pow(2).sum().backward()
    sampled = layer.router.router_replay.last_indices
    chosen = torch.zeros(256, E, dtype=torch.bool).scatter(1, sampled, True)
    report = layer.stgc.last
    assert torch.equal(report.routing_map, chosen)
    assert (~torch.isnan(report.cos[chosen])).all()  # every sampled pair was judged
    assert torch.isnan(report.cos[~chosen]).all()


# -- capacity ----------------------------------------------------------------------------

def _kept_by_megatrons_rule(probs_dropless, routing_map, factor, topk=2):
    """Per expert keep the ceil(T k / E f) pairs of highest probability (drop policy probs)."""
    tokens = routing_map.shape[0]
    capacity = math.ceil(tokens * topk / E * factor)
    kept = torch.zeros_like(routing_map)
    for expert in range(E):
        rows = routing_map[:, expert].nonzero().flatten()
        order = probs_dropless[rows, expert].argsort(descending=True)
        kept[rows[order[:capacity]], expert] = True
    return kept


def test_eval_capacity_factor_applies_in_eval_mode_only():
    train_factor, eval_factor = 0.5, 1.0
    layer = _layer(moe_config(moe_expert_capacity_factor=train_factor), gumbel=False)
    plain = _layer(moe_config(), gumbel=False)  # dropless reference, same weights
    plain.load_state_dict(layer.state_dict())
    assert install_eval_capacity(layer, train_factor, eval_factor) == 1
    x = torch.randn(64, 2, HIDDEN, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        probs, routing_map = plain.router(x)
    for mode, factor in (("train", train_factor), ("eval", eval_factor)):
        getattr(layer, mode)()
        seen = {}
        hook = layer.router.register_forward_hook(
            lambda module, args, output: seen.update(map=output[1]))
        with torch.no_grad():
            layer(x)
        hook.remove()
        assert torch.equal(seen["map"], _kept_by_megatrons_rule(probs, routing_map, factor)), mode
        assert seen["map"].sum() < routing_map.sum()  # pairs were dropped
        assert layer.config.moe_expert_capacity_factor == train_factor  # put back after


def test_model_build_combines_gumbel_with_stgc_ltdr_and_the_eval_capacity():
    """The paper YAMLs' combination through build_model: every MoE router is STGC+LTDR's with
    the Gumbel selection installed, capacity 1.5 in training and 2.0 in eval, and a training
    forward/backward and an eval forward run."""
    from dist_utils import TINY_VOCAB, tiny_config
    from megatron_stgc.ltdr.router import STGCLTDRRouter
    from megatron_stgc.stgc.router import TRACKER_NAME
    from megatron_stgc.training.setup import build_model
    from stgc_utils import forget_tracked_moe_metric

    forget_tracked_moe_metric(TRACKER_NAME)  # earlier tests sized it for a 1-layer model
    config = tiny_config(ltdr=True, stgc=True, moe_router_gumbel_second_expert=True,
                         moe_expert_capacity_factor=1.5, moe_eval_capacity_factor=2.0,
                         vision_model_type="clip", vision_num_layers=1, vision_hidden_size=32,
                         vision_num_attention_heads=4, img_h=16, img_w=16, patch_dim=8)
    image_token = TINY_VOCAB - 1
    model_parallel_cuda_manual_seed(1234)
    model, _ = build_model(config, TINY_VOCAB, image_token_id=image_token)
    routers = [m.router for m in model.modules() if hasattr(m, "router")]
    assert len(routers) == 2 and all(isinstance(r, STGCLTDRRouter) for r in routers)
    assert len(gumbel_selections(model)) == 2
    seen = []
    hooks = [r.register_forward_pre_hook(
        lambda module, args: seen.append(module.config.moe_expert_capacity_factor))
        for r in routers]
    tokens = torch.randint(0, 100, (2, 16))
    tokens[:, 1:5] = image_token
    positions, images = torch.arange(16).expand(2, -1), torch.randn(2, 3, 16, 16)
    set_router_step(model, 0)
    loss = model.train()(tokens, positions, None, labels=tokens.roll(-1, 1), images=images)
    loss.mean().backward()
    with torch.no_grad():
        model.eval()(tokens, positions, None, images=images)
    for hook in hooks:
        hook.remove()
    assert seen == [1.5, 1.5, 2.0, 2.0]
    assert all(r.router_replay.draws == 1 for r in routers)  # one noisy forward each
