"""STGC metrics per layer, reduced over all ranks (pipeline stages included).

Logged names (means over the steps since the last collect):
  stgc/token_loss              L_token (before beta)
  stgc/conflict_fraction       conflicting pairs / judged (routed, nonzero-gradient) pairs
  stgc/conflict_routing_score  mean softmax(z)[e] of conflicting pairs (paper Fig. 3a)
  stgc/gradient_consistency    mean pairwise cosine of an expert's token gradients,
                               averaged over experts (paper Fig. 3b); only for backwards
                               run with set_consistency_collection(model, True)
  stgc/mean_fallbacks          backwards (per layer and rank, summed) that used the
                               micro-batch mean because --stgc-mean-source previous-step
                               had no previous step's gradient yet; summed over
                               layers, logged only when not 0
and the same per layer as stgc/layer{N}/..., N = megatron-core layer number (1-based).
A metric that is undefined over the interval (no backward collected consistency, no
conflicting pair) is left out rather than logged as NaN.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron_stgc.stgc.attached import stgc_layers
from megatron_stgc.stgc.record import METRIC_SUM_NAMES

_COLUMNS = ("present",) + METRIC_SUM_NAMES


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def _layer_values(row: dict) -> dict[str, float]:
    present = row["present"]
    backward = row["backward_count"] / present
    return {
        "token_loss": _ratio(row["token_loss"] / present, backward),
        "conflict_fraction": _ratio(row["conflicting_pairs"], row["judged_pairs"]),
        "conflict_routing_score": _ratio(row["conflict_score_sum"], row["conflicting_pairs"]),
        "gradient_consistency": _ratio(row["consistency_sum"], row["consistency_count"]),
        "mean_fallbacks": row["mean_fallbacks"] if row["mean_fallbacks"] > 0 else math.nan,
    }


def collect_stgc_metrics(model, num_layers: int, device, group=None) -> dict[str, float]:
    """Reduce and reset every STGC layer's running sums; same result on every rank.

    A collective over ``group`` (default: world): every rank must call it together.
    device: where the reduction happens (the collective's device: CUDA under NCCL).
    The one host copy of STGC's metrics per logged step happens here.
    """
    table = torch.zeros(num_layers, len(_COLUMNS), dtype=torch.float64, device=device)
    for layer in stgc_layers(model):
        row = table[layer.stgc.layer_number - 1]
        row[0] += 1.0
        row[1:] += layer.stgc.sums.take(device)
    if dist.is_initialized():
        dist.all_reduce(table, group=group)
    metrics, per_name = {}, {}
    for index, values in enumerate(table.cpu().tolist()):
        row = dict(zip(_COLUMNS, values))
        if row["present"] == 0 or row["backward_count"] == 0:
            continue
        for name, value in _layer_values(row).items():
            if math.isnan(value):
                continue
            metrics[f"stgc/layer{index + 1}/{name}"] = value
            per_name.setdefault(name, []).append(value)
    for name, values in per_name.items():
        total = sum(values)
        metrics[f"stgc/{name}"] = total if name == "mean_fallbacks" else total / len(values)
    return metrics
