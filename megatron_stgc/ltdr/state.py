"""What an LTDR router keeps between its forward and the metric collection."""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUM_NAMES = ("image_tokens", "tail_tokens", "image_pairs", "text_loss", "text_forwards")


@dataclass
class LTDRReport:
    """The last forward of one router: rows in megatron's [s*b] order."""

    is_image: torch.Tensor  # [T] bool
    tail: torch.Tensor  # [T] bool
    routing_map: torch.Tensor  # [T, E] bool, after tail routing and capacity dropping
    threshold: torch.Tensor  # 0-d float64, the mean image RPV used


class LTDRSums:
    """Running sums of one router since the last collect (on its device, no host sync)."""

    def __init__(self):
        self.values: torch.Tensor | None = None  # float64 [len(SUM_NAMES)]

    def add(self, **named: torch.Tensor) -> None:
        row = torch.stack([named[name].to(torch.float64).reshape(()) for name in SUM_NAMES])
        self.values = row if self.values is None else self.values + row

    def take(self, device) -> torch.Tensor:
        """The sums on ``device`` (zeros if none), then reset."""
        values = self.values
        self.values = None
        if values is None:
            return torch.zeros(len(SUM_NAMES), dtype=torch.float64, device=device)
        return values.to(device)
