"""STGC settings: one dataclass, validated before any process group exists."""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("single-pass", "two-pass")
ESTIMATORS = ("exact", "lowrank", "fc2")
NORMALIZATIONS = ("pairs", "tokens")
# Where each expert's mean gradient g_mean comes from (mean_source.py).
MEAN_SOURCES = ("micro-batch", "micro-batch-bf16", "previous-step", "local")
# Which tokens STGC judges (modality_filter.py; beyond the paper): padding never.
MODALITIES = ("all", "text", "image")
# How L_token weighs the judged pairs (beyond the paper: "centered").
PUSHES = ("paper", "centered", "centered-logit")


def parse_layer_ranges(text: str | None, num_layers: int) -> frozenset[int]:
    """'0-3,6,8-9' -> {0,1,2,3,6,8,9} (0-based decoder layer indices).

    None or "all" means every layer. Raises ValueError naming --stgc-layers.
    """
    if text is None or text.strip().lower() == "all":
        return frozenset(range(num_layers))
    layers: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
            else:
                lo = hi = int(part)
        except ValueError:
            raise ValueError(f"--stgc-layers: cannot parse {part!r} in {text!r}") from None
        if lo > hi or lo < 0 or hi >= num_layers:
            raise ValueError(
                f"--stgc-layers: range {part!r} is outside layers 0-{num_layers - 1}"
            )
        layers.update(range(lo, hi + 1))
    return frozenset(layers)


@dataclass
class STGCConfig:
    """Solving Token Gradient Conflict (arXiv 2406.19905) switches.

    enabled:        add the conflict elimination loss to every selected MoE layer.
    beta:           weight of L_token in L_main + alpha * L_aux + beta * L_token.
    tau:            a (token, expert) pair conflicts when cos(g_n, g_mean) < tau.
    layers:         decoder layers (0-based ranges, e.g. "0-23") where STGC is on;
                    None = every MoE layer.
    mode:           "single-pass" (flags found and L_token applied inside one
                    backward) or "two-pass" (the paper's recipe: a backward to find
                    conflicting tokens, then the step with L_token added).
    estimator:      "exact" per-token cosines, or "lowrank": the cosine against the
                    mean gradient projected on its top-r output subspace (found by a
                    randomized range finder; cheaper for wide experts).
                    "fc2": the exact cosine over the expert's output projection (fc2)
                    parameters only, half of the extra GEMMs.
    estimator_rank: r for the "lowrank" estimator.
    normalization:  N in L_token = -(1/(N*E)) sum log softmax(-z)[e]:
                    "pairs" = number of conflicting (token, expert) pairs (default),
                    "tokens" = number of distinct tokens with at least one conflict.
    consistency_interval: compute gradient consistency (paper Fig. 3b; one more GEMM
                    per expert linear) on every N-th step; 0 = never.
    mean_source:    the expert mean gradient each token is compared with (mean_source.py):
                    "micro-batch" = this micro-batch's tokens on all expert-DP replicas
                    (an fp32 all-reduce of the local experts' gradients per micro-batch);
                    "micro-batch-bf16" = the same, all-reduced in bf16 (half the bytes);
                    "previous-step" = the previous step's expert gradient as megatron's DDP
                    reduced it (no communication; one fp32 copy of the local experts'
                    gradients; a step without one, e.g. the first, uses "micro-batch");
                    "local" = this micro-batch's tokens on this replica only (no
                    communication).
    overlap_mean_reduce: micro-batch sources: start each expert linear's all-reduce as
                    soon as autograd has its weight gradient, asynchronously, and wait only
                    where the cosines need it (local experts, no gradient-accumulation
                    fusion); False: one all-reduce once the experts' backward is done.
    mean_audit:     diagnostic: on every step also compute the flags of every mean source
                    and of the fc2 estimator against the step's mean gradient (all
                    micro-batches, all replicas) and log their agreement (mean_audit.py;
                    keeps every micro-batch's expert captures until the step ends).
    modalities:     beyond the paper: "all" (the paper: every real token), "text" or "image":
                    only tokens of that modality are judged, flagged and pushed by L_token
                    (N counts only them); needs a vision-language model (modality_filter.py).
    push:           beyond the paper: "paper" (L_token pushes each flagged pair off its expert)
                    or "centered": every judged pair of expert e weighs [flagged] - f_e, f_e
                    = the expert's fraction of flagged pairs over all tokens, so flags that do
                    not depend on the token push nothing on average; tokens flagged more often
                    than the expert's others are pushed off, the rest pulled in
                    (conflict_math.centered_push_weights; N stays the flagged count).
                    "centered-logit": the same weights on the centred logit z_e - mean(z)
                    instead of -log softmax(-z)[e], a push that does not saturate on one
                    side only (conflict_math.weighted_centered_logit_sum).
    """

    enabled: bool = False
    beta: float = 1.0
    tau: float = 0.0
    layers: str | None = None
    mode: str = "single-pass"
    estimator: str = "exact"
    estimator_rank: int = 64
    normalization: str = "pairs"
    consistency_interval: int = 10
    mean_source: str = "micro-batch"
    overlap_mean_reduce: bool = True
    mean_audit: bool = False
    modalities: str = "all"
    push: str = "paper"

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--stgc-mode must be one of {MODES}, got {self.mode!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"--stgc-estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"--stgc-normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}"
            )
        if self.mean_source not in MEAN_SOURCES:
            raise ValueError(
                f"--stgc-mean-source must be one of {MEAN_SOURCES}, got {self.mean_source!r}"
            )
        if self.modalities not in MODALITIES:
            raise ValueError(
                f"--stgc-modalities must be one of {MODALITIES}, got {self.modalities!r}"
            )
        if self.push not in PUSHES:
            raise ValueError(f"--stgc-push must be one of {PUSHES}, got {self.push!r}")
        if self.beta < 0:
            raise ValueError(f"--stgc-beta must be >= 0, got {self.beta}")
        if not -1.0 <= self.tau <= 1.0:
            raise ValueError(f"--stgc-tau must lie in [-1, 1], got {self.tau}")
        if self.consistency_interval < 0:
            raise ValueError(
                f"--stgc-consistency-interval must be >= 0, got {self.consistency_interval}"
            )
        if self.estimator_rank < 1:
            raise ValueError(f"--stgc-estimator-rank must be >= 1, got {self.estimator_rank}")

    def layer_set(self, num_layers: int) -> frozenset[int]:
        return parse_layer_ranges(self.layers, num_layers)

    @property
    def layers_named(self) -> bool:
        """True when --stgc-layers names layers (not absent, not "all"): each must be MoE."""
        return self.layers is not None and self.layers.strip().lower() != "all"
