"""Routing-stability arithmetic (pure torch, no communication; issue 22).

Three numbers say how much a router moves while it trains:

* **load churn**: the step-to-step total variation of expert-load shares,
  ``TV_t = 1/2 * sum_e |s_t[e] - s_{t-1}[e]|`` with ``s_t = c_t / sum(c_t)`` the share of
  the (token, expert) assignments of step ``t`` on each expert (one layer, one token group:
  all tokens, text or image). 0 = the same shares in both steps, 1 = disjoint experts. It
  mixes router movement with the sampling noise of each step's batch;
* **top-k change**: on a fixed probe batch, the fraction of tokens whose top-k expert set
  differs from the previous probe's (the router's movement alone: same tokens both times);
* **routing entropy**: the mean over tokens of ``H(softmax(z))`` in nats (``log E`` = flat
  logits, 0 = one expert takes all the probability).
"""

from __future__ import annotations

import torch


def per_step_counts(cumulative: torch.Tensor) -> torch.Tensor:
    """[steps, ...] running sums since the interval start -> each step's own counts."""
    first = cumulative[:1]
    return torch.cat([first, cumulative[1:] - cumulative[:-1]]) if len(cumulative) > 1 else first


def load_share_tv(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step-to-step total variation of load shares.

    counts: [steps, ..., experts] assignments per expert of consecutive steps.
    Returns (tv_sum [...], pairs [...]): the sum over consecutive step pairs of
    ``1/2 * sum_e |s_t - s_{t-1}|`` and how many pairs entered it (a step without any
    assignment in a group has no shares: its pairs are left out).
    """
    counts = counts.to(torch.float64)
    totals = counts.sum(dim=-1, keepdim=True)  # [steps, ..., 1]
    shares = counts / totals.clamp(min=1.0)
    valid = (totals[1:] > 0) & (totals[:-1] > 0)  # [steps - 1, ..., 1]
    tv = 0.5 * (shares[1:] - shares[:-1]).abs().sum(dim=-1, keepdim=True)
    tv = torch.where(valid, tv, torch.zeros_like(tv))
    return tv.sum(dim=0).squeeze(-1), valid.sum(dim=0).squeeze(-1).to(torch.float64)


def topk_map(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """[tokens, experts] bool: each token's ``topk`` highest-scoring experts."""
    chosen = torch.topk(scores, topk, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, chosen, True)


def changed_sets(previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """[tokens] bool: the token's expert set differs between two [tokens, experts] maps."""
    return (previous != current).any(dim=-1)


def routing_entropy(logits: torch.Tensor) -> torch.Tensor:
    """[tokens] H(softmax(logits)) in nats, computed in fp32."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1)


def group_sums(values: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Sums of ``values`` [tokens] over each group of ``groups`` [tokens, G] (bool) -> [G],
    float64, as one matmul (no boolean indexing, no host sync)."""
    return groups.to(torch.float64).t() @ values.to(torch.float64)
