"""LTDR settings: one dataclass, validated before any process group exists."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class LTDRConfig:
    """Long-tailed Distribution-aware Router (arXiv 2507.01351) switches.

    enabled:          turn LTDR on for every MoE layer of the language model.
    top_a:            experts a "tail" vision token is routed to (None = all experts).
    modality_balance: megatron's load-balancing loss on the non-image tokens only
                      (image tokens get no balancing pressure).
    tail_routing:     image tokens whose routing-probability variance is above the mean
                      over the image tokens of the global micro-batch go to their top-a
                      experts instead of top-k.
    """

    enabled: bool = False
    top_a: Optional[int] = None  # Optional[...]: the flag parser reads this spelling
    modality_balance: bool = True
    tail_routing: bool = True

    def validate(self, num_experts: int | None = None, topk: int | None = None) -> None:
        if not self.enabled:
            return
        if not (self.modality_balance or self.tail_routing):
            raise ValueError("--ltdr with --no-ltdr-modality-balance and --no-ltdr-tail-routing "
                             "does nothing; drop --ltdr instead")
        if self.top_a is None or num_experts is None:
            return
        if topk is not None and self.top_a < topk:
            raise ValueError(f"--ltdr-top-a ({self.top_a}) must be >= --moe-router-topk ({topk})")
        if self.top_a > num_experts:
            raise ValueError(f"--ltdr-top-a ({self.top_a}) must be <= --num-experts "
                             f"({num_experts})")

    def resolved_top_a(self, num_experts: int) -> int:
        """a for tail tokens: top_a, or every expert when it is None."""
        return num_experts if self.top_a is None else self.top_a
