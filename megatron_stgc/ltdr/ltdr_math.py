"""LTDR's tensor math (pure torch, no megatron-core, no process groups).

Tokens are rows in megatron's router order ([s, b] flattened, T = s*b), E experts.

* Routing-probability variance (RPV) of a token: the variance over experts of its
  softmax routing probabilities, population form (divide by E). The tail test compares
  RPVs with their mean, so the E/(E-1) of the unbiased form would not change a flag.
* The tail threshold is the mean RPV of the image tokens of the global micro-batch:
  each rank contributes (sum of its image RPVs, its image count); the caller sums those
  over the ranks that hold the micro-batch's tokens. A token is "tail" when it is an
  image token and its RPV is strictly above that mean.
* A tail token's row of (probs, routing map) is replaced by its top-a row; the other
  rows keep megatron's top-k row.
"""

from __future__ import annotations

import torch


def routing_prob_variance(logits: torch.Tensor) -> torch.Tensor:
    """[T, E] router logits -> [T] float32 variance over experts of softmax(logits)."""
    probs = torch.softmax(logits.detach().float(), dim=-1)  # [T, E]
    return probs.var(dim=-1, unbiased=False)  # [T]


def image_rpv_totals(rpv: torch.Tensor, is_image: torch.Tensor) -> torch.Tensor:
    """float64 [2]: (sum of the image tokens' RPV, number of image tokens) on this rank."""
    image = is_image.to(torch.float64)  # [T]
    return torch.stack([(rpv.to(torch.float64) * image).sum(), image.sum()])


def tail_threshold(totals: torch.Tensor) -> torch.Tensor:
    """Mean image RPV from (sum, count) totals (0-d float64; +inf when there is no image)."""
    return torch.where(totals[1] > 0, totals[0] / totals[1].clamp(min=1.0),
                       torch.full_like(totals[0], float("inf")))


def tail_flags(rpv: torch.Tensor, is_image: torch.Tensor, totals: torch.Tensor) -> torch.Tensor:
    """[T] bool: image tokens whose RPV lies strictly above the mean image RPV."""
    return is_image & (rpv.to(torch.float64) > tail_threshold(totals))


def merge_tail_rows(probs: torch.Tensor, routing_map: torch.Tensor, wide_probs: torch.Tensor,
                    wide_map: torch.Tensor, tail: torch.Tensor):
    """Rows of tail tokens from (wide_probs, wide_map), the others from (probs, routing_map).

    All [T, E]; tail [T] bool. Gradients reach each input only through its own rows.
    """
    pick = tail.unsqueeze(-1)  # [T, 1]
    return torch.where(pick, wide_probs, probs), torch.where(pick, wide_map, routing_map)


def balance_exclusion(is_image: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """[T] bool, True = left out of megatron's balancing loss (megatron's padding_mask sense):
    image tokens, and whatever the caller's padding mask already excluded."""
    if padding_mask is None:
        return is_image
    return is_image | padding_mask.reshape(-1).bool()


def routed_pairs_of(routing_map: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """0-d float64: (token, expert) pairs of the map on the selected rows ([T] bool)."""
    return (routing_map.to(torch.float64) * rows.to(torch.float64).unsqueeze(-1)).sum()
