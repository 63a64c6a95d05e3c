"""Per-layer STGC state: one ConflictRecord per forward, and what a layer exposes.

A ``ConflictRecord`` follows one micro-batch through one MoE layer: the expert
captures (forward), the dispatcher's return route (forward), the expert-side
cosines (experts' backward) and the router-side conflict map (router backward).
Autograd nodes hold their record, so micro-batches in flight never mix.

``LayerSTGCState`` is what the layer owns: the config, the record of the forward
in progress, the two-pass queue, running metrics and ``last``, the report of the
last backward (documented in docs/ARCHITECTURE.md, section STGC).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from megatron_stgc.plugin import RunningSums
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
                  the token was not routed to the expert, was dropped, is padding (the
                  model's padding_mask) or had a zero gradient.
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
    return_route: object | None = None  # return_route.AllToAllRoute | AllGatherRoute
    tokens_per_expert: list[int] | None = None
    row_probs: torch.Tensor | None = None  # [R] probs of the dispatched rows
    routing_map: torch.Tensor | None = None  # [T, E] router side
    cos_map: torch.Tensor | None = None  # [T, E] router side, set by the experts' backward
    preset_conflicts: torch.Tensor | None = None  # two-pass: pass 1's conflicts
    preset_judged: torch.Tensor | None = None  # two-pass: pass 1's judged pairs (defined cos)
    # [T, 1] bool, False on padding and on tokens --stgc-modalities leaves out (None: all)
    real_rows: torch.Tensor | None = None

    def judged_map(self) -> torch.Tensor:
        """[T, E] the pairs STGC may judge: routed, not dropped, not padding. Padding has no
        gradient once megatron's balancing loss leaves it out; the mask makes it explicit."""
        if self.real_rows is None:
            return self.routing_map
        return self.routing_map & self.real_rows.to(self.routing_map.device)

    def release_capture(self) -> None:
        """Drop the expert captures (called once the expert side has read them)."""
        if self.capture is not None:
            self.capture.close()
        self.capture = None


METRIC_SUM_NAMES = (
    "token_loss", "judged_pairs", "conflicting_pairs", "conflict_score_sum",
    "consistency_sum", "consistency_count", "backward_count", "mean_fallbacks",
)


class MetricSums(RunningSums):
    """Running sums since the last collect, on the device they were computed on.

    Adding never copies to the host (no sync in backward); metrics.collect_stgc_metrics
    takes them once per logged step (``take``) and reduces them over ranks.
    """

    def __init__(self):
        super().__init__(METRIC_SUM_NAMES)

    def add_backward(self, token_loss, judged_pairs, conflicting_pairs, conflict_score_sum):
        """One backward's global (already all-reduced) totals, 0-d tensors."""
        self.add(token_loss=token_loss, judged_pairs=judged_pairs,
                  conflicting_pairs=conflicting_pairs, conflict_score_sum=conflict_score_sum,
                  backward_count=torch.ones((), device=token_loss.device))

    def add_mean_fallback(self, device) -> None:
        """One backward that used the micro-batch mean in place of the previous step's."""
        self.add(mean_fallbacks=torch.ones((), device=device))

    def add_consistency(self, consistency: torch.Tensor) -> None:
        """Per-expert gradient consistency [local_E], NaN for experts with < 2 tokens."""
        defined = ~torch.isnan(consistency)
        self.add(consistency_sum=torch.where(defined, consistency, 0.0).sum(),
                  consistency_count=defined.sum())



@dataclass
class LayerSTGCState:
    config: STGCConfig
    layer_number: int | None = None
    current: ConflictRecord | None = None
    mode: str = SINGLE_PASS
    # two-pass: (conflicts, judged pairs) per micro-batch, [T, E] bool each
    identified: deque = field(default_factory=deque)
    collect_consistency: bool = False
    paused: bool = False  # True: forwards run as plain megatron-core (no L_token, no capture)
    sums: MetricSums = field(default_factory=MetricSums)
    last: STGCReport | None = None
    # previous-step mean source: the last step's reduced expert gradients (step_grads.py)
    previous_step_grads: list | None = None
    audit: object | None = None  # a mean_audit.MeanAudit while --stgc-mean-audit is on
    overlapped_backwards: int = 0  # backwards whose G all-reduce overlapped the experts'

    def mean_source_now(self, device) -> str:
        """The mean source this backward uses: previous-step without a previous step's
        gradient (first step, after a resume or a skipped update) uses micro-batch, counted
        in stgc/mean_fallbacks."""
        source = self.config.mean_source
        if source == "previous-step" and self.previous_step_grads is None:
            self.sums.add_mean_fallback(device)
            return "micro-batch"
        return source

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
            self.current.preset_conflicts, self.current.preset_judged = \
                self.identified.popleft()
        return self.current
