"""What an LTDR router keeps between its forward and the metric collection."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_stgc.plugin import RunningSums

SUM_NAMES = ("image_tokens", "tail_tokens", "image_pairs", "text_loss", "text_forwards")


@dataclass
class LTDRReport:
    """The last forward of one router: rows in megatron's [s*b] order."""

    is_image: torch.Tensor  # [T] bool
    tail: torch.Tensor  # [T] bool
    routing_map: torch.Tensor  # [T, E] bool, after tail routing and capacity dropping
    threshold: torch.Tensor  # 0-d float64, the mean image RPV used


class LTDRSums(RunningSums):
    """Running sums of one router since the last collect (on its device, no host sync)."""

    def __init__(self):
        super().__init__(SUM_NAMES)
