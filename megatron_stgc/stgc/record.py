"""Per-layer STGC state: one ConflictRecord per forward, and what a layer exposes.

A ``ConflictRecord`` follows one micro-batch through one MoE layer: the expert
captures (forward), the dispatcher's return route (forward), the expert-side
cosines (experts' backward) and the router-side conflict map (router backward).
Autograd nodes hold their record, so micro-batches in flight never mix.

``LayerSTGCState`` is what the layer owns: the config, the record of the forward
in progress, the two-pass queue, running metrics and ``last``, the report of the
last backward (documented in README, section STGC).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from megatron_stgc.stgc.capture import ExpertCapture
from megatron_stgc.stgc.config import STGCConfig

# How a forward's record behaves in backward.
SINGLE_PASS = "single-pass"  # find conflicts and apply L_token in the same backward
IDENTIFY = "identify"  # two-pass, pass 1: find conflicts only, apply nothing
APPLY = "apply"  # two-pass, pass 2: apply L_token with pass 1's conflicts


@dataclass
class STGCReport:
    """The last backward's STGC view of one layer, on the tokens' own (router) rank.

    cos:          [tokens, experts] fp32 cos(g_n, g_mean) of each routed pair; NaN where
                  the token was not routed to the expert, was dropped, or had a zero gradient.
    conflicts:    [tokens, experts] bool, the pairs L_token pushed away (cos < tau).
    routing_map:  [tokens, experts] bool, megatron-core's routing map of that forward.
    """

    cos: torch.Tensor
    conflicts: torch.Tensor
    routing_map: torch.Tensor


@dataclass
class ConflictRecord:
    mode: str
    capture: ExpertCapture = field(default_factory=ExpertCapture)
    route: object | None = None  # return_route.AllToAllRoute | AllGatherRoute
    tokens_per_expert: list[int] | None = None
    row_probs: torch.Tensor | None = None  # [R] probs of the dispatched rows
    routing_map: torch.Tensor | None = None  # [T, E] router side
    cos_map: torch.Tensor | None = None  # [T, E] router side, set by the experts' backward
    preset_conflicts: torch.Tensor | None = None  # two-pass: pass 1's conflicts


@dataclass
class MetricSums:
    """Running sums since the last collect; reduced over ranks by metrics.collect_stgc_metrics."""

    token_loss: float = 0.0
    conflicting_pairs: float = 0.0
    judged_pairs: float = 0.0
    conflict_score_sum: float = 0.0
    consistency_sum: float = 0.0
    consistency_count: float = 0.0
    backward_count: float = 0.0


@dataclass
class LayerSTGCState:
    config: STGCConfig
    layer_number: int | None = None
    current: ConflictRecord | None = None
    mode: str = SINGLE_PASS
    identified: deque = field(default_factory=deque)  # two-pass: conflicts per micro-batch
    collect_consistency: bool = False
    paused: bool = False  # True: forwards run as plain megatron-core (no L_token, no capture)
    sums: MetricSums = field(default_factory=MetricSums)
    last: STGCReport | None = None

    def begin_forward(self, training: bool) -> ConflictRecord | None:
        """Start the record of a forward that will be back-propagated (else None)."""
        if self.paused or not (training and torch.is_grad_enabled()):
            self.current = None
            return None
        self.current = ConflictRecord(mode=self.mode)
        if self.mode == APPLY:
            if not self.identified:
                raise RuntimeError(
                    "STGC two-pass: the apply pass ran more micro-batches through layer "
                    f"{self.layer_number} than the identify pass"
                )
            self.current.preset_conflicts = self.identified.popleft()
        return self.current
