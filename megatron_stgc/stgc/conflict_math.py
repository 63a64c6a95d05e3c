"""The STGC math as plain torch functions: no hooks, no process groups.

Notation (one expert, one linear layer y = W x + c * b inside it):
    X: [N, in]   the layer's inputs for the N tokens the expert holds
    D: [N, out]  dL/dy for those tokens (captured in backward)
    c: [N]       how the bias enters token n (1 for fc1; megatron-core multiplies the
                 fc2 bias by the routing prob, so c = prob there); None without bias
Token n's gradient w.r.t. (W, b) is rank one: g_n = (D_n X_n^T, c_n D_n), so
    ||g_n||^2      = ||D_n||^2 (||X_n||^2 + c_n^2)
    <g_n, G>       = D_n^T G_W X_n + c_n D_n . G_b      (G = sum_n g_n)
and summing those over all the expert's linears gives cos(g_n, g_mean) without ever
forming a per-token gradient. The cosine does not depend on the 1/N in g_mean.
All functions compute in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LinearGrads:
    """What one linear layer of one expert contributes (fp32)."""

    inputs: torch.Tensor  # X [N, in]
    output_grads: torch.Tensor  # D [N, out]
    bias_coef: torch.Tensor | None = None  # c [N]; None when the linear has no bias
    # G_W and G_b when autograd already computed them (the ordinary weight gradient)
    known_weight_grad: torch.Tensor | None = None  # [out, in]
    known_bias_grad: torch.Tensor | None = None  # [out]


def weight_grad_sum(lin: LinearGrads) -> torch.Tensor:
    """G_W = sum_n D_n X_n^T = D^T X  -> [out, in]."""
    if lin.known_weight_grad is not None:
        return lin.known_weight_grad
    return lin.output_grads.t() @ lin.inputs


def bias_grad_sum(lin: LinearGrads) -> torch.Tensor | None:
    """G_b = sum_n c_n D_n -> [out], or None without bias."""
    if lin.bias_coef is None:
        return None
    if lin.known_bias_grad is not None:
        return lin.known_bias_grad
    return lin.bias_coef @ lin.output_grads


def token_grad_sq_norms(lin: LinearGrads) -> torch.Tensor:
    """||g_n||^2 restricted to this linear -> [N]."""
    x_sq = lin.inputs.square().sum(dim=1)
    if lin.bias_coef is not None:
        x_sq = x_sq + lin.bias_coef.square()
    return lin.output_grads.square().sum(dim=1) * x_sq


def token_grad_dots(
    lin: LinearGrads, g_weight: torch.Tensor, g_bias: torch.Tensor | None
) -> torch.Tensor:
    """<g_n, G> restricted to this linear -> [N]. g_weight: [out, in], g_bias: [out]."""
    out_dim, in_dim = g_weight.shape
    if in_dim <= out_dim:  # same GEMM cost either way; keep the narrower temporary
        dots = ((lin.output_grads @ g_weight) * lin.inputs).sum(dim=1)  # D_n^T G, [N, in]
    else:
        dots = ((lin.inputs @ g_weight.t()) * lin.output_grads).sum(dim=1)  # G X_n, [N, out]
    if g_bias is not None:
        dots = dots + lin.bias_coef * (lin.output_grads @ g_bias)
    return dots


def cosines_from_stats(
    sq_norms: torch.Tensor, dots: torch.Tensor, mean_sq_norm: torch.Tensor
) -> torch.Tensor:
    """cos_n = <g_n, G> / (||g_n|| ||G||); NaN where either norm is zero -> [N]."""
    denom = (sq_norms * mean_sq_norm).sqrt()
    cos = dots / denom
    return torch.where(denom > 0, cos, torch.full_like(cos, float("nan")))


def cosines_with_own_term(
    sq_norms: torch.Tensor, dots: torch.Tensor, mean_sq_norm: torch.Tensor
) -> torch.Tensor:
    """cos(g_n, P + g_n) from ||g_n||^2, <g_n, P> and ||P||^2 -> [N]; NaN where undefined.

    For a mean P that does not contain token n (e.g. an earlier step's gradient): the
    mean over the token's own batch always contains its own gradient once, and with many
    nearly orthogonal token gradients that term is what keeps most cosines positive.
    ||P + g_n||^2 = ||P||^2 + 2 <g_n, P> + ||g_n||^2.
    """
    denom = (sq_norms * (mean_sq_norm + 2 * dots + sq_norms).clamp(min=0)).sqrt()
    cos = (dots + sq_norms) / denom
    return torch.where(denom > 0, cos, torch.full_like(cos, float("nan")))


def expert_token_cosines(linears: list[LinearGrads]) -> torch.Tensor:
    """cos(g_n, g_mean) over all of one expert's linears, single replica -> [N].

    The reference composition of the functions above; the expert-parallel code
    runs the same steps with G all-reduced across expert replicas in between.
    """
    sq_norms = sum(token_grad_sq_norms(lin) for lin in linears)
    mean_sq, dots = 0.0, 0.0
    for lin in linears:
        g_w, g_b = weight_grad_sum(lin), bias_grad_sum(lin)
        mean_sq = mean_sq + g_w.square().sum() + (g_b.square().sum() if g_b is not None else 0.0)
        dots = dots + token_grad_dots(lin, g_w, g_b)
    return cosines_from_stats(sq_norms, dots, torch.as_tensor(mean_sq))


def conflict_mask(cos: torch.Tensor, tau: float) -> torch.Tensor:
    """A pair conflicts when cos < tau; NaN (not judged) never conflicts."""
    return cos < tau


def draw_probe(in_dim: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    """A Gaussian test matrix [in, r] for lowrank_basis, drawn by a CPU generator (the same
    numbers on every device)."""
    return torch.randn(in_dim, rank, generator=generator, dtype=torch.float32)


def lowrank_basis(g_weight: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """Orthonormal U [out, r] spanning G's dominant column space (one power step).

    probe: [in, r'] on G's device (draw_probe); r = min(r', out).
    """
    out_dim, _ = g_weight.shape
    probe = probe[:, :min(probe.shape[1], out_dim)]
    range_sample = g_weight @ (g_weight.t() @ (g_weight @ probe))  # [out, r]
    basis, _ = torch.linalg.qr(range_sample)
    return basis


def token_grad_dots_lowrank(
    lin: LinearGrads, g_weight: torch.Tensor, g_bias: torch.Tensor | None, basis: torch.Tensor
) -> torch.Tensor:
    """<g_n, G> with the other tokens' part of G_W projected on U U^T (U: [out, r]) -> [N].

    <g_n, G> = ||D_n||^2 ||X_n||^2 (token n's own share, exact) + D_n^T (G_W - D_n X_n^T) X_n.
    Only the second term is approximated, by D_n^T U U^T (G_W - D_n X_n^T) X_n. Projecting
    the whole G would also shrink the always-positive self term and bias the cosine
    towards conflict. Costs N*r*(in+out) instead of N*in*out.
    """
    core = basis.t() @ g_weight  # [r, in]
    grads_in_basis = lin.output_grads @ basis  # [N, r]
    x_sq = lin.inputs.square().sum(dim=1)
    projected_all = ((lin.inputs @ core.t()) * grads_in_basis).sum(dim=1)
    projected_self = grads_in_basis.square().sum(dim=1) * x_sq
    exact_self = lin.output_grads.square().sum(dim=1) * x_sq
    dots = projected_all - projected_self + exact_self
    if g_bias is not None:
        dots = dots + lin.bias_coef * (lin.output_grads @ g_bias)
    return dots


def normalized_grad_sum_weight(lin: LinearGrads, inv_norms: torch.Tensor) -> torch.Tensor:
    """sum_n g_n(W) / ||g_n|| -> [out, in] (inv_norms: [N], 0 where ||g_n|| = 0)."""
    return (lin.output_grads * inv_norms[:, None]).t() @ lin.inputs


def normalized_grad_sum_bias(lin: LinearGrads, inv_norms: torch.Tensor) -> torch.Tensor | None:
    if lin.bias_coef is None:
        return None
    return (lin.bias_coef * inv_norms) @ lin.output_grads


def gradient_consistency(normalized_sum_sq: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """Mean cosine between the gradients of two different tokens of an expert.

    mean_{n != m} cos(g_n, g_m) = (||sum_n g_n/||g_n||||^2 - N) / (N (N - 1)).
    The paper's "mean of the cosine-similarity matrix" also counts the diagonal
    (||S||^2 / N^2), which adds 1/N: an expert holding one token would score 1.0
    and the average over experts would track token counts, not agreement. Off the
    diagonal it measures agreement only. NaN for experts with fewer than 2 tokens.
    """
    pairs = num_tokens * (num_tokens - 1)
    value = (normalized_sum_sq - num_tokens) / pairs.clamp(min=1)
    return torch.where(num_tokens >= 2, value, torch.full_like(value, float("nan")))


def inverted_nll_sum(logits: torch.Tensor, conflicts: torch.Tensor) -> torch.Tensor:
    """-sum_{(n,e) conflicting} log softmax(-z_n)[e] (fp32).

    logits: [T, E] router logits z; conflicts: [T, E] bool.
    """
    return weighted_inverted_nll_sum(logits, conflicts.float())


def weighted_inverted_nll_sum(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """-sum_{n,e} w_ne log softmax(-z_n)[e] (fp32). w > 0 pushes token n off expert e,
    w < 0 pulls it towards e, w = 0 leaves the pair alone.

    logits: [T, E] router logits z; weights: [T, E].
    """
    inverted_log_probs = torch.log_softmax(-logits.float(), dim=-1)
    return -(inverted_log_probs * weights.float()).sum()


def weighted_centered_logit_sum(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_{n,e} w_ne (z_ne - mean_j z_nj) (fp32; beyond the paper).

    The push of weighted_inverted_nll_sum without its saturation: d/dz_nj = w_ne ([j == e]
    - 1/E) for every pair, however far z_ne has already moved. -log softmax(-z)[e] stops
    pushing once z_e is the lowest logit but keeps pulling (w < 0) at full strength once
    z_e is the highest, so centred weights that sum to zero still sharpen the router.
    logits: [T, E]; weights: [T, E].
    """
    z = logits.float()
    return ((z - z.mean(dim=-1, keepdim=True)) * weights.float()).sum()


def expert_flag_rates(flagged_per_expert: torch.Tensor,
                      judged_per_expert: torch.Tensor) -> torch.Tensor:
    """f_e = flagged pairs / judged pairs of expert e (0 where none was judged) -> [E]."""
    return flagged_per_expert.float() / judged_per_expert.float().clamp(min=1.0)


def centered_push_weights(conflicts: torch.Tensor, judged: torch.Tensor,
                          flag_rates: torch.Tensor) -> torch.Tensor:
    """w_ne = [flagged] - f_e on every judged pair, 0 elsewhere -> [T, E] (beyond the paper).

    conflicts, judged: [T, E] bool; flag_rates: [E] (expert_flag_rates over all tokens).
    The paper's push is w = [flagged]. When the flags do not depend on the token (noise),
    every routed pair is flagged with probability f_e and that push has expectation f_e > 0
    on every pair: it lowers the logits of whichever experts a token is routed to, which
    flattens the router. Subtracting f_e makes the expected push zero in that case, and
    leaves a net push off the expert only for tokens flagged more often than its others;
    the unflagged pairs are pulled towards their expert by f_e. Each expert's weights sum
    to zero over its judged pairs.
    """
    return torch.where(judged, conflicts.float() - flag_rates.float()[None, :], 0.0)


def conflict_elimination_loss(
    logits: torch.Tensor, conflicts: torch.Tensor, normalizer: float | torch.Tensor
) -> torch.Tensor:
    """L_token = -(1/(N*E)) * sum_{(n,e) conflicting} log softmax(-z_n)[e].

    logits:     [T, E] router logits z (computed in fp32)
    conflicts:  [T, E] bool, True for each conflicting (token, assigned expert) pair
    normalizer: N (number of conflicting pairs, or of tokens; see STGCConfig); N = 0
                (no conflicts) gives 0.

    This is Eq. 10 of the paper with the minus sign its stated intent needs:
    minimising it LOWERS softmax(z)[e] for the conflicting pair (d/dz_e > 0).
    """
    num_experts = logits.shape[-1]
    normalizer = torch.as_tensor(normalizer, dtype=torch.float32).clamp(min=1.0)
    return inverted_nll_sum(logits, conflicts) / (normalizer * num_experts)
