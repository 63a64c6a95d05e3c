"""--stgc-mean-audit: how often each mean source flags the same pairs as the step's mean.

The reference is what the paper's "mean over a batch" means for a step with gradient
accumulation and expert data parallelism: the expert's gradient summed over every
micro-batch of the step on every expert-DP replica. It exists only once the step's
last backward is done, so no run can use it; the audit measures how closely the
usable sources (mean_source.py) and the fc2 estimator reproduce its flags.

Per STGC layer, ``add_micro_batch`` (called by the layer in each backward) keeps the
micro-batch's captured rows and forms the micro-batch sources' G (the audit's own
all-reduces: an audited step communicates more than an ordinary one). ``finish_step``
(after the step) forms the reference G, judges every kept row against every source
and the reference, and adds to the counts; the reference G becomes the next step's
previous-step source. All flags are cos < tau over the same rows; a row is judged when
its reference cosine is defined (nonzero gradient).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_stgc.stgc.conflict_math import LinearGrads, conflict_mask
from megatron_stgc.stgc.expert_side import row_cosines
from megatron_stgc.stgc.mean_source import LinearMean, all_reduce_sums, local_grad_sums

AUDITED = ("micro-batch", "micro-batch-bf16", "previous-step", "previous-step+own",
           "previous-step+local", "local", "fc2")
# per audited source: judged rows, rows whose flag equals the reference's, rows it flags,
# rows both it and the reference flag, rows the reference flags, rows whose flag equals
# the micro-batch source's (the exact per-micro-batch mode)
COUNT_NAMES = ("judged", "agree", "flagged", "both", "reference", "agree_micro_batch")


@dataclass
class _MicroBatch:
    experts: list[list[LinearGrads]]  # per local expert, per linear (fc1, fc2)
    local: list[list[LinearMean]]  # this replica's G
    means: dict[str, list[list[LinearMean]]]  # G per micro-batch source


def _sum_means(a: list[list[LinearMean]], b: list[list[LinearMean]]) -> list[list[LinearMean]]:
    return [[(wa + wb, None if ba is None else ba + bb) for (wa, ba), (wb, bb) in zip(xa, xb)]
            for xa, xb in zip(a, b)]


def _detached(experts: list[list[LinearGrads]]) -> list[list[LinearGrads]]:
    return [[LinearGrads(lin.inputs.detach(), lin.output_grads.detach(), lin.bias_coef)
             for lin in linears] for linears in experts]


@dataclass
class MeanAudit:
    """One STGC layer's audit; ``counts`` [len(AUDITED), len(COUNT_NAMES)] since collect."""

    tau: float
    micro_batches: list[_MicroBatch] = field(default_factory=list)
    previous: list[list[LinearMean]] | None = None  # last step's reference G
    counts: torch.Tensor | None = None

    def add_micro_batch(self, experts: list[list[LinearGrads]], expert_dp_group) -> None:
        experts = _detached(experts)
        local = local_grad_sums(experts)
        means = {"local": local,
                 "micro-batch": all_reduce_sums(local, expert_dp_group),
                 "micro-batch-bf16": all_reduce_sums(local, expert_dp_group, torch.bfloat16)}
        self.micro_batches.append(_MicroBatch(experts, local, means))

    def finish_step(self, expert_dp_group) -> None:
        """Judge the step's rows against the reference; collective over expert-DP."""
        if not self.micro_batches:
            return
        step_local = self.micro_batches[0].local
        for micro in self.micro_batches[1:]:
            step_local = _sum_means(step_local, micro.local)
        reference = all_reduce_sums(step_local, expert_dp_group)
        for micro in self.micro_batches:
            for expert, linears in enumerate(micro.experts):
                self._judge_expert(linears, reference[expert], micro, expert)
        self.previous, self.micro_batches = reference, []

    def _judge_expert(self, linears, reference: list[LinearMean], micro: _MicroBatch,
                      expert: int) -> None:
        ref_cos = row_cosines(linears, reference)  # [N]
        judged = ~torch.isnan(ref_cos)
        ref_flags = conflict_mask(ref_cos, self.tau) & judged
        cosines = {source: self._source_cosines(source, linears, micro, expert)
                   for source in AUDITED}
        exact_flags = conflict_mask(cosines["micro-batch"], self.tau) & judged
        rows = []
        for source, cos in cosines.items():
            if cos is None:  # previous-step on the first audited step
                rows.append(torch.zeros(len(COUNT_NAMES), dtype=torch.float64,
                                        device=ref_cos.device))
                continue
            flags = conflict_mask(cos, self.tau) & judged
            rows.append(torch.stack([judged.sum(), ((flags == ref_flags) & judged).sum(),
                                     flags.sum(), (flags & ref_flags).sum(), ref_flags.sum(),
                                     ((flags == exact_flags) & judged).sum()]
                                    ).to(torch.float64))
        table = torch.stack(rows)
        self.counts = table if self.counts is None else self.counts + table

    def _source_cosines(self, source, linears, micro: _MicroBatch, expert: int):
        if source.startswith("previous-step"):
            if self.previous is None:
                return None
            previous = self.previous[expert]
            if source == "previous-step+local":
                previous = _sum_means([previous], [micro.local[expert]])[0]
            return row_cosines(linears, previous, add_own_term=source == "previous-step+own")
        if source == "fc2":
            return row_cosines(linears[-1:], micro.means["micro-batch"][expert][-1:])
        return row_cosines(linears, micro.means[source][expert])


def collect_audit_metrics(audits: list[MeanAudit], device) -> dict[str, float]:
    """stgc/audit/<source>/{agreement,recall,precision,conflict_fraction,
    agreement_with_micro_batch} and stgc/audit/reference_conflict_fraction
    over all layers and ranks since the last collect (collective over the world)."""
    table = torch.zeros(len(AUDITED), len(COUNT_NAMES), dtype=torch.float64, device=device)
    for audit in audits:
        if audit.counts is not None:
            table += audit.counts.to(device)
            audit.counts = None
    if dist.is_initialized():
        dist.all_reduce(table)
    metrics = {}
    for source, row in zip(AUDITED, table.cpu().tolist()):
        counts = dict(zip(COUNT_NAMES, row))
        if counts["judged"] == 0:
            continue
        metrics[f"stgc/audit/{source}/agreement"] = counts["agree"] / counts["judged"]
        metrics[f"stgc/audit/{source}/conflict_fraction"] = counts["flagged"] / counts["judged"]
        metrics[f"stgc/audit/{source}/agreement_with_micro_batch"] = (
            counts["agree_micro_batch"] / counts["judged"])
        if source == "micro-batch":  # judged on every step (previous-step skips the first)
            metrics["stgc/audit/reference_conflict_fraction"] = (counts["reference"]
                                                                 / counts["judged"])
        if counts["reference"] > 0:
            metrics[f"stgc/audit/{source}/recall"] = counts["both"] / counts["reference"]
        if counts["flagged"] > 0:
            metrics[f"stgc/audit/{source}/precision"] = counts["both"] / counts["flagged"]
    return metrics
