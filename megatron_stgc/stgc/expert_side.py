"""Expert rank: per-row cos(g_n, g_mean) for the local experts, expert-parallel.

Runs inside the backward of the join node (after all local experts' backward):
  1.+2. G per expert and linear from the mean source (mean_source.py); by default
     G = sum_n g_n of the captured rows (fp32), all-reduced over the expert-data-parallel
     group -> the mean over the global micro-batch (the 1/N does not change a cosine);
  3. per-row ||g_n||^2 and <g_n, G>;
  4. cos per row, NaN where a row is padding (prob 0) or its gradient is zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_stgc.stgc import conflict_math
from megatron_stgc.stgc.conflict_math import LinearGrads
from megatron_stgc.stgc.mean_source import EarlyMeanReduce, LinearMean, expert_means, group_size


@dataclass
class ExpertResult:
    row_cos: torch.Tensor  # [R] rows in the experts' order
    consistency: torch.Tensor | None = None  # [local_E] mean pairwise cosine, or None


def _all_reduce(tensor: torch.Tensor, group) -> torch.Tensor:
    if group_size(group) > 1:
        dist.all_reduce(tensor, group=group)
    return tensor


# lowrank estimator: (in_dim, rank, seed, device) -> the probe, copied to the device once
# (a host-to-device copy per backward would be a host sync; tests/test_host_copies.py).
# Every expert of a layer shares it; memory: rank x (in_fc1 + in_fc2) fp32 per layer.
_PROBES: dict[tuple, torch.Tensor] = {}


def lowrank_probe(in_dim: int, rank: int, seed: int, device) -> torch.Tensor:
    """The range finder's probe [in_dim, rank] for ``seed`` on ``device``, made once."""
    key = (in_dim, rank, seed, str(device))
    if key not in _PROBES:
        generator = torch.Generator().manual_seed(seed)
        _PROBES[key] = conflict_math.draw_probe(in_dim, rank, generator).to(device)
    return _PROBES[key]


def _row_stats(linears, grads, estimator: str, rank: int, seed: int):
    sq_norms = sum(conflict_math.token_grad_sq_norms(lin) for lin in linears)
    dots = torch.zeros_like(sq_norms)
    for lin, (g_w, g_b) in zip(linears, grads):
        if estimator == "lowrank":
            probe = lowrank_probe(g_w.shape[1], rank, seed, g_w.device)
            basis = conflict_math.lowrank_basis(g_w, probe)
            dots = dots + conflict_math.token_grad_dots_lowrank(lin, g_w, g_b, basis)
        else:
            dots = dots + conflict_math.token_grad_dots(lin, g_w, g_b)
    return sq_norms, dots


def _mean_sq_norm(grads) -> torch.Tensor:
    total = torch.zeros((), device=grads[0][0].device)
    for g_w, g_b in grads:
        total = total + g_w.square().sum()
        if g_b is not None:
            total = total + g_b.square().sum()
    return total


def _consistency(linears, inv_norms: torch.Tensor, expert_dp_group) -> torch.Tensor:
    pieces = []
    for lin in linears:
        pieces.append(conflict_math.normalized_grad_sum_weight(lin, inv_norms).reshape(-1))
        s_b = conflict_math.normalized_grad_sum_bias(lin, inv_norms)
        if s_b is not None:
            pieces.append(s_b)
    normalized_sum = _all_reduce(torch.cat(pieces), expert_dp_group)
    return normalized_sum.square().sum()


def row_cosines(linears: list[LinearGrads], grads: list[LinearMean], estimator: str = "exact",
                rank: int = 64, seed: int = 0, add_own_term: bool = False) -> torch.Tensor:
    """cos(g_n, G) for one expert's rows against the given G per linear -> [N];
    add_own_term: cos(g_n, G + g_n) (G does not contain the rows' own gradients)."""
    sq_norms, dots = _row_stats(linears, grads, estimator, rank, seed)
    cosines = (conflict_math.cosines_with_own_term if add_own_term
               else conflict_math.cosines_from_stats)
    return cosines(sq_norms, dots, _mean_sq_norm(grads))


def expert_row_cosines(
    experts: list[list[LinearGrads]],
    row_probs: torch.Tensor,
    expert_dp_group,
    estimator: str = "exact",
    rank: int = 64,
    seed: int = 0,
    with_consistency: bool = False,
    mean_source: str = "micro-batch",
    previous: list[list[LinearMean]] | None = None,
    early: EarlyMeanReduce | None = None,
) -> ExpertResult:
    """cos(g_n, g_mean) for every dispatched row of the local experts.

    experts: per local expert, its LinearGrads (rows = that expert's dispatched rows)
    row_probs: [R] routing prob of every row (0 marks quantization padding rows)
    mean_source / previous / early: where G comes from (mean_source.expert_means)
    """
    if estimator == "fc2":  # parameter-subset estimator: the output projection only
        experts = [linears[-1:] for linears in experts]
        previous = None if previous is None else [means[-1:] for means in previous]
    grads = expert_means(mean_source, experts, expert_dp_group, previous, early)
    row_cos, counts, consistency = [], [], []
    for linears, expert_grads in zip(experts, grads):
        sq_norms, dots = _row_stats(linears, expert_grads, estimator, rank, seed)
        mean_sq = _mean_sq_norm(expert_grads)
        row_cos.append(conflict_math.cosines_from_stats(sq_norms, dots, mean_sq))
        counts.append((sq_norms > 0).sum())
        if with_consistency:
            norms = sq_norms.sqrt()
            inv = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
            consistency.append(_consistency(linears, inv, expert_dp_group))
    cos = torch.cat(row_cos) if row_cos else row_probs.new_zeros(0, dtype=torch.float32)
    cos = torch.where(row_probs.float() != 0, cos, torch.full_like(cos, float("nan")))
    result = ExpertResult(cos, None)
    if with_consistency and consistency:
        num_tokens = _all_reduce(torch.stack(counts).float(), expert_dp_group)
        result.consistency = conflict_math.gradient_consistency(torch.stack(consistency), num_tokens)
    return result
