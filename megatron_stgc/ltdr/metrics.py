"""LTDR metrics per MoE layer, reduced over all ranks (pipeline stages included).

Logged names (over the training forwards since the last collect):
  ltdr/tail_fraction              image tokens routed as tail / image tokens
  ltdr/experts_per_vision_token   routed (token, expert) pairs of image tokens / image tokens
                                  (after capacity dropping)
  ltdr/text_balance_loss          megatron's aux_loss (coefficient 1) over the non-image
                                  tokens, mean over forwards that had such tokens; logged
                                  whether or not --ltdr-modality-balance trains with it
and the same per layer as ltdr/layer{N}/..., N = megatron-core layer number (1-based).
Tokens per expert per modality are logged by training/expert_load.py already.
A metric undefined over the interval (no image token) is left out, not logged as NaN.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron_stgc.ltdr.attached import ltdr_routers
from megatron_stgc.ltdr.state import SUM_NAMES


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def _layer_values(row: dict) -> dict[str, float]:
    return {
        "tail_fraction": _ratio(row["tail_tokens"], row["image_tokens"]),
        "experts_per_vision_token": _ratio(row["image_pairs"], row["image_tokens"]),
        "text_balance_loss": _ratio(row["text_loss"], row["text_forwards"]),
    }


def _summed_table(model, num_layers: int, device, group) -> torch.Tensor:
    """float64 [num_layers, sums]: every rank's router sums, reset, all-reduced."""
    table = torch.zeros(num_layers, len(SUM_NAMES), dtype=torch.float64, device=device)
    for router in ltdr_routers(model):
        table[router.layer_number - 1] += router.ltdr_sums.take(device)
    if dist.is_initialized():
        dist.all_reduce(table, group=group)
    return table


def collect_ltdr_metrics(model, num_layers: int, device, group=None) -> dict[str, float]:
    """Reduce and reset every LTDR router's sums; same result on every rank (collective)."""
    metrics, per_name = {}, {}
    for index, values in enumerate(_summed_table(model, num_layers, device, group).tolist()):
        for name, value in _layer_values(dict(zip(SUM_NAMES, values))).items():
            if math.isnan(value):
                continue
            metrics[f"ltdr/layer{index + 1}/{name}"] = value
            per_name.setdefault(name, []).append(value)
    for name, values in per_name.items():
        metrics[f"ltdr/{name}"] = sum(values) / len(values)
    return metrics
