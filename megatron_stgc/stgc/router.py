"""STGCRouter: megatron-core's TopKRouter plus the conflict elimination loss.

The router's logits pass through ``_AddConflictLossGrad``, an identity in forward.
Its backward runs only once every consumer of the logits has sent its gradient,
i.e. after the dispatched rows have gone through the experts' backward, where
STGC found the conflicting pairs and sent their cosines back to this rank. It adds
beta * dL_token/dz (all E logits of every token with a conflicting pair) to the
logit gradient before autograd reaches the router weights: one backward pass.

Scaling, so that the result is the same in every parallel layout:
  * N (conflicting pairs or tokens) is summed over every rank holding tokens of
    the same global micro-batch (tp x dp x cp), so L_token is the global loss;
  * megatron-core's DDP averages gradients over dp x cp, so each rank's share is
    multiplied by dp x cp;
  * the main-loss backward scale megatron-core hands to MoEAuxLossAutoScaler
    (1/num_micro_batches, the fp16 loss scale) is applied like the aux loss's;
  * with calculate_per_token_loss the share is multiplied by the local token
    count, as megatron-core does for its aux loss (exact when all ranks hold the
    same number of tokens).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    save_to_aux_losses_tracker,
)
from megatron.core.transformer.moe.router import TopKRouter

from megatron_stgc.stgc import math as stgc_math
from megatron_stgc.stgc.expert_side import group_size
from megatron_stgc.stgc.record import APPLY, IDENTIFY, ConflictRecord, LayerSTGCState, STGCReport


def _main_loss_scale(device) -> torch.Tensor:
    """megatron-core's main-loss backward scale (0-d, on ``device``; no host sync)."""
    scale = MoEAuxLossAutoScaler.main_loss_backward_scale
    if scale is None:
        return torch.ones((), device=device)
    return scale.detach().float().reshape(()).to(device)


class STGCRouter(TopKRouter):
    """TopKRouter whose logit gradient also carries beta * dL_token/dz."""

    stgc: LayerSTGCState | None = None  # set by STGCMoELayer after it builds the router

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        record = None if self.stgc is None else self.stgc.current
        if record is not None:
            logits = _AddConflictLossGrad.apply(logits, self, record)
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        if record is not None:
            record.routing_map = routing_map.detach()
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
        return record.routing_map & stgc_math.conflict_mask(record.cos_map, self.stgc.config.tau)

    def conflict_logit_grad(self, logits: torch.Tensor, record: ConflictRecord) -> torch.Tensor:
        """beta * dL_token/dz for this rank's tokens, scaled for megatron-core -> [T, E]."""
        config = self.stgc.config
        conflicts = self.conflicts_of(record)
        if record.mode == IDENTIFY:
            self.stgc.identified.append(conflicts)
            self._report(record, conflicts)
            return torch.zeros_like(logits)
        with torch.enable_grad():
            z = logits.detach().float().requires_grad_(True)
            nll_sum = stgc_math.inverted_nll_sum(z, conflicts)
            (nll_grad,) = torch.autograd.grad(nll_sum, z)
        totals = self._global_totals(logits, conflicts, record, nll_sum.detach())
        normalizer = totals[0].clamp(min=1.0) * logits.shape[-1]
        loss_scale = _main_loss_scale(logits.device)
        scale = config.beta * self._layout_scale(logits) * loss_scale / normalizer
        self._log(totals, normalizer)
        self._report(record, conflicts)
        return (nll_grad * scale).to(logits.dtype)

    def _global_totals(self, logits, conflicts, record, nll_sum) -> torch.Tensor:
        """[N, judged pairs, conflicting pairs, score sum of conflicting pairs, nll sum]."""
        if self.stgc.config.normalization == "tokens":
            count = conflicts.any(dim=1).sum()
        else:
            count = conflicts.sum()
        judged = record.routing_map
        if record.cos_map is not None:
            judged = judged & ~torch.isnan(record.cos_map)
        scores = torch.softmax(logits.detach().float(), dim=-1)[conflicts].sum()
        totals = torch.stack(
            [count.float(), judged.sum().float(), conflicts.sum().float(), scores, nll_sum.float()]
        )
        if group_size(self.tp_dp_cp_group) > 1:
            dist.all_reduce(totals, group=self.tp_dp_cp_group)
        return totals

    def _layout_scale(self, logits) -> float:
        dp_cp_size = group_size(self.tp_dp_cp_group) // group_size(self.tp_cp_group)
        if self.calculate_per_token_loss:
            return dp_cp_size * logits.shape[0]
        return dp_cp_size

    def _log(self, totals: torch.Tensor, normalizer: torch.Tensor) -> None:
        sums = self.stgc.sums
        token_loss = float(totals[4] / normalizer)
        sums.token_loss += token_loss
        sums.judged_pairs += float(totals[1])
        sums.conflicting_pairs += float(totals[2])
        sums.conflict_score_sum += float(totals[3])
        sums.backward_count += 1
        num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
        save_to_aux_losses_tracker(
            "stgc_token_loss", torch.tensor(token_loss), self.layer_number, num_layers
        )

    def _report(self, record: ConflictRecord, conflicts: torch.Tensor) -> None:
        cos = record.cos_map
        if cos is None:
            cos = torch.full_like(conflicts, float("nan"), dtype=torch.float32)
        cos = torch.where(record.routing_map, cos, torch.full_like(cos, float("nan")))
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
        ctx.record.capture = None
        return grad_logits + extra.view_as(grad_logits), None, None
