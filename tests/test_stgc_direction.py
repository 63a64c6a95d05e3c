"""The paper's statistical verification at toy scale (Fig. 3a / 3b), with L_token alone.

Tokens come from four input clusters; clusters 0/1 (and 2/3) look alike to the
router but their losses pull the expert in opposite directions, so experts that
hold both have conflicting tokens. The router is trained with L_token's gradient
only (experts frozen).
"""

import pytest
import torch

from megatron_stgc.stgc.metrics import collect_stgc_metrics
from megatron_stgc.stgc.attached import set_consistency_collection
from stgc_utils import STGCConfig, build_stgc_layer, init_single_process, moe_config

HIDDEN, TOKENS = 16, 256


def _conflicting_clusters(seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(2, HIDDEN, generator=gen) * 2
    target = torch.randn(HIDDEN, generator=gen)
    means = torch.stack([base[0], base[0] + 0.3 * torch.randn(HIDDEN, generator=gen),
                         base[1], base[1] + 0.3 * torch.randn(HIDDEN, generator=gen)])
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0])
    cluster = torch.arange(TOKENS) % 4
    hidden = means[cluster] + 0.5 * torch.randn(TOKENS, HIDDEN, generator=gen)
    weights = sign[cluster][:, None] * target + 0.3 * torch.randn(TOKENS, HIDDEN, generator=gen)
    return hidden.reshape(64, 4, HIDDEN), weights.reshape(64, 4, HIDDEN)


def _router_trainer(seed):
    """A layer with frozen experts whose router learns from L_token's gradient alone."""
    layer = build_stgc_layer(moe_config(gated_linear_unit=True), STGCConfig(enabled=True),
                             seed=seed + 10)
    set_consistency_collection(layer, True)
    hidden, weights = _conflicting_clusters(seed)

    def router_grad(beta):
        layer.stgc.config.beta = beta
        layer.zero_grad()
        out, _ = layer(hidden)
        ((out * weights).sum() / TOKENS).backward()
        return layer.router.weight.grad.clone()

    def score(pairs):
        with torch.no_grad():
            logits = hidden.reshape(-1, HIDDEN) @ layer.router.weight.t()
            return float(torch.softmax(logits, dim=-1)[pairs].mean())

    def token_loss_step(lr):
        """One SGD step on L_token alone -> (targeted pairs' score before, after)."""
        token_loss_grad = router_grad(1.0) - router_grad(0.0)
        conflicts = layer.stgc.last.conflicts.clone()
        assert conflicts.any()
        before = score(conflicts)
        with torch.no_grad():
            layer.router.weight -= lr * token_loss_grad
        return before, score(conflicts)

    def consistency():
        router_grad(1.0)
        return collect_stgc_metrics(layer, 1, device="cpu")["stgc/gradient_consistency"]

    return token_loss_step, consistency


@pytest.mark.parametrize("seed", [0, 1])
def test_each_token_loss_step_lowers_conflicting_pairs_routing_score(seed):
    """Fig. 3a: the routing score of conflicting pairs on their assigned experts falls."""
    init_single_process()
    token_loss_step, _ = _router_trainer(seed)
    for _ in range(10):
        before, after = token_loss_step(lr=5.0)
        assert after < before


@pytest.mark.parametrize("seed", [0, 1])
def test_training_on_token_loss_raises_gradient_consistency(seed):
    """Fig. 3b: the mean cosine between an expert's token gradients rises (toy scale;
    single steps are noisy, so compare the later half of 60 steps with the start)."""
    init_single_process()
    token_loss_step, consistency = _router_trainer(seed)
    initial = consistency()
    later = []
    for step in range(60):
        token_loss_step(lr=0.5)
        if step >= 30:
            later.append(consistency())
    assert sum(later) / len(later) > initial + 0.02
