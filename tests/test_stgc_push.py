"""--stgc-push centered / centered-logit (beyond the paper; conflict_math.centered_push_weights,
weighted_centered_logit_sum) against the slow way: the pure weights, and the router
gradient of a real megatron-core step.

The tiny MoE-LLaVA of test_stgc_modalities.py (tau 0.1, STGC on the first MoE layer) runs
one micro-batch with --stgc-push centered and with beta 0. The router weight gradient's
difference must equal beta / (N E) * sum over every judged pair (t, e) of
([t, e flagged] - f_e) * d(-log softmax(-z_t)[e])/dz_t x_t^T, built token by token in
float64, with f_e = flagged / judged pairs of expert e counted here from the flags and
cosines (N = flagged pairs); centered-logit: d(z_te - mean z_t)/dz_t instead.
"""

from __future__ import annotations

import pytest
import torch

from dist_utils import run_on_ranks
from llava_batches import layout, synthetic_samples
from megatron_stgc.config import ConfigError, parse_run_config
from megatron_stgc.validation import validate_run_config
from megatron_stgc.stgc import conflict_math
from test_stgc_modalities import (SAMPLES, _hand_token_loss_grad, _one_setting,
                                  hand_push_grad)


def test_centered_weights_sum_to_zero_per_expert_and_vanish_for_token_blind_flags():
    generator = torch.Generator().manual_seed(3)
    judged = torch.rand(64, 4, generator=generator) < 0.5
    conflicts = judged & (torch.rand(64, 4, generator=generator) < 0.3)
    rates = conflict_math.expert_flag_rates(conflicts.sum(0), judged.sum(0))
    weights = conflict_math.centered_push_weights(conflicts, judged, rates)
    assert torch.allclose(weights.sum(dim=0), torch.zeros(4), atol=1e-5)
    assert (weights[~judged] == 0).all()
    assert (weights[conflicts] > 0).all() and (weights[judged & ~conflicts] <= 0).all()
    # a token flagged at the expert's rate on average (here: every judged pair half
    # flagged, two draws) gets no net push over the draws
    rates = torch.full((4,), 0.5)
    both = (conflict_math.centered_push_weights(judged, judged, rates)
            + conflict_math.centered_push_weights(torch.zeros_like(judged), judged, rates))
    assert (both == 0).all()


def test_the_paper_push_is_the_flag_weighted_sum():
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    conflicts = torch.rand(5, 4, generator=torch.Generator().manual_seed(2)) < 0.4
    assert torch.equal(conflict_math.inverted_nll_sum(logits, conflicts),
                       conflict_math.weighted_inverted_nll_sum(logits, conflicts.float()))


def _runs(rank, world_size):
    from megatron_stgc import parallel

    parallel.initialize_model_parallel(1, 1, seed=1234)
    samples, images, has_image = synthetic_samples(SAMPLES, seed=20, max_ids=30)
    batch = layout(samples, images, has_image)
    return {push: _one_setting("all", beta, batch, stgc_push=push)
            for push, beta in (("centered", 1.0), ("centered-logit", 1.0), ("paper", 0.0))}


@pytest.fixture(scope="module")
def runs():
    return run_on_ranks(_runs, 1)[0]


def _hand_centered_grad(run: dict, beta: float, centered_logit: bool) -> torch.Tensor:
    weight, inputs, flags = run["router_weight"], run["router_input"], run["conflicts"]
    judged = ~run["cos"].isnan()  # the report: NaN off the routed, real, defined pairs
    num_experts = weight.shape[0]
    rates = [flags[:, e].sum().item() / max(judged[:, e].sum().item(), 1)
             for e in range(num_experts)]
    pairs = [(t, e, float(flags[t, e]) - rates[e]) for t, e in judged.nonzero().tolist()]
    scale = beta / (max(int(flags.sum()), 1) * num_experts)
    return scale * hand_push_grad(pairs, weight, inputs, centered_logit)


@pytest.mark.parametrize("push", ["centered", "centered-logit"])
def test_centered_push_router_gradient_matches_the_slow_way(runs, push):
    centered, beta_zero = runs[push], runs["paper"]
    assert torch.equal(centered["router_input"], beta_zero["router_input"])
    assert centered["conflicts"].any() and (~centered["conflicts"] & ~centered["cos"].isnan()).any()
    expected = _hand_centered_grad(centered, 1.0, push == "centered-logit")
    measured = centered["router_grad"] - beta_zero["router_grad"]
    assert expected.abs().max() > 1e-4
    assert torch.allclose(measured, expected, atol=1e-6, rtol=1e-4)
    paper = _hand_token_loss_grad(centered["conflicts"], centered["router_weight"],
                                  centered["router_input"], beta=1.0)
    other = _hand_centered_grad(centered, 1.0, push != "centered-logit")
    for wrong in (paper, other):  # the test tells the three pushes apart
        assert not torch.allclose(measured, wrong, atol=1e-4, rtol=0)


def test_an_unknown_push_is_refused():
    config = parse_run_config(["--stgc", "--num-experts", "4", "--stgc-push", "centred"])
    with pytest.raises(ConfigError, match="--stgc-push must be one of"):
        validate_run_config(config, 1)
