"""The pure STGC functions against brute force."""

import torch

from megatron_stgc.stgc import conflict_math
from megatron_stgc.stgc.conflict_math import LinearGrads


def _random_linears(gen, rows=40, bias=(True, False)):
    linears = []
    for with_bias, (d_in, d_out) in zip(bias, [(6, 10), (10, 6)]):
        coef = torch.rand(rows, generator=gen) if with_bias else None
        linears.append(LinearGrads(torch.randn(rows, d_in, generator=gen),
                                   torch.randn(rows, d_out, generator=gen), coef))
    return linears


def _explicit_token_grads(linears):
    """[rows, params] per-token gradients, formed explicitly."""
    parts = []
    for lin in linears:
        parts.append(torch.einsum("no,ni->noi", lin.output_grads, lin.inputs).flatten(1))
        if lin.bias_coef is not None:
            parts.append(lin.bias_coef[:, None] * lin.output_grads)
    return torch.cat(parts, dim=1).double()


def test_rank_one_cosines_equal_explicit_per_token_gradients():
    gen = torch.Generator().manual_seed(0)
    linears = _random_linears(gen)
    grads = _explicit_token_grads(linears)
    mean = grads.mean(0)
    expected = grads @ mean / (grads.norm(dim=1) * mean.norm())
    got = conflict_math.expert_token_cosines(linears)
    assert torch.allclose(got.double(), expected, atol=1e-5)


def test_zero_gradient_tokens_are_not_judged():
    gen = torch.Generator().manual_seed(1)
    linears = _random_linears(gen)
    for lin in linears:
        lin.output_grads[3] = 0
    cos = conflict_math.expert_token_cosines(linears)
    assert torch.isnan(cos[3]) and not torch.isnan(cos[torch.arange(40) != 3]).any()
    assert not conflict_math.conflict_mask(cos, 0.0)[3]


def test_lowrank_estimator_is_exact_at_full_rank_and_close_at_low_rank():
    gen = torch.Generator().manual_seed(2)
    lin = _random_linears(gen, bias=(False, False))[0]
    g_w = conflict_math.weight_grad_sum(lin)
    exact = conflict_math.token_grad_dots(lin, g_w, None)
    probe = conflict_math.draw_probe(g_w.shape[1], 10, torch.Generator().manual_seed(0))
    full = conflict_math.lowrank_basis(g_w, probe)  # rank min(10, out) = full
    assert torch.allclose(conflict_math.token_grad_dots_lowrank(lin, g_w, None, full), exact, atol=1e-4)
    low = conflict_math.lowrank_basis(g_w, probe[:, :2])
    approx = conflict_math.token_grad_dots_lowrank(lin, g_w, None, low)
    assert not torch.allclose(approx, exact, atol=1e-4)  # rank 2 of 6 is an approximation
    assert torch.corrcoef(torch.stack([approx, exact]))[0, 1] > 0.5


def test_gradient_consistency_is_mean_cosine_between_distinct_tokens():
    gen = torch.Generator().manual_seed(3)
    linears = _random_linears(gen)
    grads = _explicit_token_grads(linears)
    unit = grads / grads.norm(dim=1, keepdim=True)
    cosines = unit @ unit.T
    expected = (cosines.sum() - cosines.diagonal().sum()) / (40 * 39)
    inv = 1.0 / grads.norm(dim=1).float()
    total = 0.0
    for lin in linears:
        total = total + conflict_math.normalized_grad_sum_weight(lin, inv).square().sum()
        s_b = conflict_math.normalized_grad_sum_bias(lin, inv)
        if s_b is not None:
            total = total + s_b.square().sum()
    got = conflict_math.gradient_consistency(total, torch.tensor(40.0))
    assert abs(float(got) - float(expected)) < 1e-5


def test_conflict_loss_matches_equation_with_sign_fixed():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 4, generator=gen)
    conflicts = torch.zeros(6, 4, dtype=torch.bool)
    conflicts[0, 1] = conflicts[2, 3] = conflicts[2, 0] = True
    loss = conflict_math.conflict_elimination_loss(logits, conflicts, normalizer=3)
    inverted = torch.softmax(-logits, dim=-1)
    expected = -(inverted[0, 1].log() + inverted[2, 3].log() + inverted[2, 0].log()) / (3 * 4)
    assert torch.allclose(loss, expected)
    assert conflict_math.conflict_elimination_loss(logits, conflicts & False, normalizer=0) == 0


def test_minimising_conflict_loss_lowers_assigned_expert_score():
    """The paper's printed Eq. 10 misses a minus sign; ours lowers p(z)[assigned] (Fig. 3a)."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(32, 4, generator=gen, requires_grad=True)
    assigned = torch.randint(0, 4, (32,), generator=gen)
    conflicts = torch.nn.functional.one_hot(assigned, 4).bool()
    before = torch.softmax(logits, -1)[conflicts].detach()
    loss = conflict_math.conflict_elimination_loss(logits, conflicts, normalizer=32)
    (grad,) = torch.autograd.grad(loss, logits)
    assert (grad[conflicts] > 0).all()  # descent lowers every assigned logit
    assert (grad[~conflicts] < 0).all()  # and raises the others
    after = torch.softmax(logits.detach() - 5.0 * grad, -1)[conflicts]
    assert (after < before).all()
