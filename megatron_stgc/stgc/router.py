"""STGCRouter: megatron-core's TopKRouter plus the conflict elimination loss gradient.

``routing`` starts this forward's ConflictRecord and passes the logits through
``_AddConflictLossGrad``, an identity in forward. Its backward runs only once every
consumer of the logits has sent its gradient, i.e. after the dispatched rows went
through the experts' backward, where STGC found the conflicting pairs and sent their
cosines back to this rank. It adds beta * dL_token/dz (all E logits of every token
with a conflicting pair) to the logit gradient before autograd reaches the router
weights: one backward pass. How strong that is in each parallel layout: loss_scale.py.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.router import TopKRouter

from megatron_stgc.mcore_compat import record_moe_metric
from megatron_stgc.stgc import conflict_math, modality_filter
from megatron_stgc.stgc.mean_source import group_size
from megatron_stgc.stgc.loss_scale import local_grad_scale
from megatron_stgc.stgc.record import APPLY, IDENTIFY, ConflictRecord, LayerSTGCState, STGCReport

TRACKER_NAME = "stgc_token_loss"  # megatron's MoE metric tracker: moe/stgc_token_loss


class STGCRouter(TopKRouter):
    """TopKRouter whose logit gradient also carries beta * dL_token/dz."""

    stgc: LayerSTGCState | None = None  # set by STGCMoELayer after it builds the router
    modality = None  # the model's ModalityContext (modality_filter.attach_modality)

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        record = None if self.stgc is None else self.stgc.begin_forward(self.training)
        if record is not None:
            logits = _AddConflictLossGrad.apply(logits, self, record)
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        if record is not None:
            record.routing_map = routing_map.detach()
            real = None
            if padding_mask is not None:  # megatron's sense: True = padding
                real = ~padding_mask.reshape(-1, 1).bool()
            chosen = modality_filter.chosen_rows(self.stgc.config.modalities, self.modality)
            record.real_rows = modality_filter.judged_rows(real, chosen)
        return probs, routing_map

    # -- backward-time work, called by _AddConflictLossGrad -------------------------
    def conflicts_of(self, record: ConflictRecord) -> torch.Tensor:
        if record.mode == APPLY:
            return record.preset_conflicts
        if record.cos_map is None:
            raise RuntimeError(
                f"STGC layer {self.layer_number}: the router backward ran before the experts' "
                "backward delivered the conflict flags"
            )
        return record.judged_map() & conflict_math.conflict_mask(record.cos_map,
                                                                 self.stgc.config.tau)

    def conflict_logit_grad(self, logits: torch.Tensor, record: ConflictRecord) -> torch.Tensor:
        """beta * dL_token/dz for this rank's tokens, scaled for megatron-core -> [T, E]."""
        conflicts = self.conflicts_of(record)
        self._report(record, conflicts)
        if record.mode == IDENTIFY:
            self.stgc.identified.append((conflicts, self._judged_pairs(record)))
            return torch.zeros_like(logits)
        weights = self._push_weights(conflicts, record)
        with torch.enable_grad():
            z = logits.detach().float().requires_grad_(True)
            if self.stgc.config.push == "centered-logit":
                nll_sum = conflict_math.weighted_centered_logit_sum(z, weights)
            else:
                nll_sum = conflict_math.weighted_inverted_nll_sum(z, weights)
            (nll_grad,) = torch.autograd.grad(nll_sum, z)
        totals = self._global_totals(logits, conflicts, record, nll_sum.detach())
        normalizer = totals[0].clamp(min=1.0) * logits.shape[-1]
        scale = local_grad_scale(self.stgc.config.beta, normalizer, self.tp_dp_cp_group,
                                 self.tp_cp_group, logits.device)
        self._log(totals, normalizer)
        return (nll_grad * scale).to(logits.dtype)

    @staticmethod
    def _judged_pairs(record: ConflictRecord) -> torch.Tensor:
        """[T, E] bool: routed real pairs with a defined cosine (two-pass apply: pass 1's,
        since the apply pass computes no cosines)."""
        if record.preset_judged is not None:
            return record.preset_judged
        judged = record.judged_map()
        if record.cos_map is not None:
            judged = judged & ~torch.isnan(record.cos_map)
        return judged

    def _push_weights(self, conflicts: torch.Tensor, record: ConflictRecord) -> torch.Tensor:
        """[T, E] L_token's weight per pair: the paper's [flagged], or centered on each
        expert's flag rate over every rank's tokens (--stgc-push centered)."""
        if self.stgc.config.push == "paper":
            return conflicts.float()
        judged = self._judged_pairs(record)
        per_expert = torch.stack([conflicts.sum(dim=0), judged.sum(dim=0)]).float()  # [2, E]
        if group_size(self.tp_dp_cp_group) > 1:
            dist.all_reduce(per_expert, group=self.tp_dp_cp_group)
        rates = conflict_math.expert_flag_rates(per_expert[0], per_expert[1])
        return conflict_math.centered_push_weights(conflicts, judged, rates)

    def _global_totals(self, logits, conflicts, record, nll_sum) -> torch.Tensor:
        """[N, judged pairs, conflicting pairs, score sum of conflicting pairs, nll sum]."""
        if self.stgc.config.normalization == "tokens":
            count = conflicts.any(dim=1).sum()
        else:
            count = conflicts.sum()
        judged = self._judged_pairs(record)
        probs = torch.softmax(logits.detach().float(), dim=-1)
        scores = torch.where(conflicts, probs, 0.0).sum()
        totals = torch.stack(
            [count.float(), judged.sum().float(), conflicts.sum().float(), scores, nll_sum.float()]
        )
        if group_size(self.tp_dp_cp_group) > 1:
            dist.all_reduce(totals, group=self.tp_dp_cp_group)
        return totals

    def _log(self, totals: torch.Tensor, normalizer: torch.Tensor) -> None:
        """Add this backward to the layer's running sums and megatron's MoE tracker (on device)."""
        token_loss = totals[4] / normalizer
        self.stgc.sums.add_backward(token_loss, judged_pairs=totals[1],
                                    conflicting_pairs=totals[2], conflict_score_sum=totals[3])
        num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
        record_moe_metric(TRACKER_NAME, token_loss, self.layer_number, num_layers)

    def _report(self, record: ConflictRecord, conflicts: torch.Tensor) -> None:
        cos = record.cos_map
        if cos is None:
            cos = torch.full_like(conflicts, float("nan"), dtype=torch.float32)
        cos = torch.where(record.judged_map(), cos, torch.full_like(cos, float("nan")))
        self.stgc.last = STGCReport(cos=cos, conflicts=conflicts, routing_map=record.routing_map)


class _AddConflictLossGrad(torch.autograd.Function):
    """Identity on the router logits; backward adds beta * dL_token/dz."""

    @staticmethod
    def forward(ctx, logits, router: STGCRouter, record: ConflictRecord):
        ctx.router, ctx.record = router, record
        ctx.save_for_backward(logits)
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad_logits):
        (logits,) = ctx.saved_tensors
        flat = logits.reshape(-1, logits.shape[-1])
        extra = ctx.router.conflict_logit_grad(flat, ctx.record)
        ctx.record.release_capture()
        ctx.router = ctx.record = None
        return grad_logits + extra.view_as(grad_logits), None, None
