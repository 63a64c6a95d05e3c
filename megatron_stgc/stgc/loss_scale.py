"""How strongly each rank's router receives L_token: megatron-core's scaling rules.

L_token of one micro-batch is global: the NLL of the conflicting pairs of every rank
holding tokens of the same global micro-batch (TP x DP x CP), divided by N * E with N
counted over those ranks (router.py all-reduces the counts). Its gradient w.r.t. the
router weight, which every rank holds a copy of, is the SUM of the ranks' local parts.

megatron-core, in every supported version (0.16.1-0.19.2), then
  * multiplies each backward through its MoE aux-loss autoscaler by the main-loss
    scale: fp16 loss scale x CP size / micro-batches (mcore_compat.main_loss_backward_scale);
  * sums the router-weight gradient over TP (sequence parallel: each TP rank routes its
    own tokens) and AVERAGES it over DP x CP in DDP.
So each rank multiplies its part by the DP size: DP x (CP / micro-batches) / (DP x CP)
leaves the sum of the parts over the micro-batch count, i.e. the gradient of the mean
over micro-batches of the global L_token, the same in every layout.

Modes whose rules differ are rejected when the layer is built (layer.check_supported):
``calculate_per_token_loss`` (megatron scales router losses by local tokens there,
times TP x CP since 0.19) and context parallelism (CP > 1 is not tested).
"""

from __future__ import annotations

import torch

from megatron_stgc.mcore_compat import main_loss_backward_scale
from megatron_stgc.stgc.mean_source import group_size


def data_parallel_size(tp_dp_cp_group, tp_cp_group) -> int:
    """DP = |TP x DP x CP| / |TP x CP|."""
    return group_size(tp_dp_cp_group) // group_size(tp_cp_group)


def local_grad_scale(beta: float, normalizer: torch.Tensor, tp_dp_cp_group, tp_cp_group,
                     device) -> torch.Tensor:
    """Factor on this rank's d(sum of its conflicting pairs' NLL)/dz (0-d, on ``device``).

    normalizer: N * E, N already summed over the TP x DP x CP group.
    """
    layout = data_parallel_size(tp_dp_cp_group, tp_cp_group)
    return beta * layout * main_loss_backward_scale(device) / normalizer
