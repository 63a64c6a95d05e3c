"""LTDRRouter: megatron-core's TopKRouter with LTDR's two changes, and STGC + LTDR.

``routing`` (megatron's own signature, ``padding_mask`` included):
  1. tail flags: RPV per token, the mean image RPV of the global micro-batch (one
     all-reduce of (sum, count) over the router's tp_dp_cp group in training; this rank's
     tokens in eval), image tokens above it;
  2. modality balancing: megatron's ``TopKRouter.routing`` runs with the image tokens
     added to its ``padding_mask``, so its balancing loss (aux_loss / seq_aux_loss) counts
     the non-image tokens alone. That argument exists, with that meaning, in every
     supported megatron-core release (0.16.1 to 0.19.2): no version switch;
  3. tail routing: tail rows are replaced by megatron's ``topk_routing_with_score_function``
     run with a experts and the layer's own score settings. So the weights of a tail token
     follow megatron's top-k convention for a: topk-then-softmax (the default for k > 1, and
     MoE-LLaVA's) renormalises over the a chosen experts; --moe-router-pre-softmax keeps the
     softmax over all experts (renormalised only when a = E, the default a); sigmoid scores
     are divided by their sum over the a chosen. The scaling factor applies as for top-k.
     With --moe-expert-capacity-factor megatron's ``apply_router_token_dropping`` runs again
     on the merged map with megatron's capacity (tokens x k x factor / E per expert) and
     drop policy: tail tokens' extra pairs compete for the same slots; top-k pairs megatron
     already dropped stay dropped.
When the micro-batch has no image token (or LTDR is off) the result is megatron's, exactly.

``STGCLTDRRouter`` puts STGC outside LTDR (MRO STGCRouter -> LTDRRouter -> TopKRouter), so
STGC's record holds the final routing map: it judges the extra pairs of tail tokens too.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.router import TopKRouter

from megatron_stgc.ltdr import ltdr_math
from megatron_stgc.ltdr.config import LTDRConfig
from megatron_stgc.ltdr.state import LTDRReport, LTDRSums
from megatron_stgc.ltdr.supported import check_ltdr_supported
from megatron_stgc.model.modality import IMAGE
from megatron_stgc.stgc.router import STGCRouter


def _inside_backward() -> bool:
    return torch._C._current_graph_task_id() != -1  # activation recompute


class LTDRRouter(TopKRouter):
    """TopKRouter with modality-specific balancing and top-a routing of tail image tokens."""

    def __init__(self, config, pg_collection=None, ltdr_config: LTDRConfig | None = None,
                 **mcore_kwargs):
        super().__init__(config, pg_collection=pg_collection, **mcore_kwargs)
        self.ltdr_config = ltdr_config or LTDRConfig(enabled=True)
        check_ltdr_supported(config, self.ltdr_config)
        self.top_a = self.ltdr_config.resolved_top_a(self.config.num_moe_experts)
        self.modality = None  # the model's ModalityContext, set by attached.attach_modality
        self.ltdr_sums = LTDRSums()
        self.ltdr_last: LTDRReport | None = None
        self._forward_rows = None  # (image mask, any image) of the last training forward

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        rows = self._image_rows(logits)
        if rows is None:
            return super().routing(logits, padding_mask=padding_mask)
        is_image, has_image = rows
        flat = logits.reshape(-1, self.config.num_moe_experts)  # [T, E]
        rpv = ltdr_math.routing_prob_variance(flat)  # [T]
        totals = self._image_rpv_totals(rpv, is_image)
        tail = ltdr_math.tail_flags(rpv, is_image, totals)  # [T]
        left_out = ltdr_math.balance_exclusion(is_image, padding_mask)  # image + padding
        if has_image and self.ltdr_config.modality_balance:
            padding_mask = left_out
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        if has_image and self.ltdr_config.tail_routing:
            probs, routing_map = self._route_tail_wider(flat, probs, routing_map, tail)
        self._record(flat, is_image, tail, routing_map, totals, left_out)
        return probs, routing_map

    def _image_rows(self, logits: torch.Tensor):
        """([T] bool image mask aligned with the router's rows, any image?); None = route as
        megatron. Activation recompute re-runs this forward inside the backward, after the
        model has cleared its modality: it reuses the mask of the forward it repeats."""
        if _inside_backward():
            return self._forward_rows
        current = None if self.modality is None else self.modality.current
        if current is None:
            if self.training and torch.is_grad_enabled():
                raise RuntimeError(
                    f"LTDR layer {self.layer_number}: training forward without a token modality "
                    "(the model must set its ModalityContext; see ltdr/attached.py)")
            return None
        num_rows = logits.numel() // self.config.num_moe_experts
        if current.numel() != num_rows:
            raise ValueError(f"LTDR layer {self.layer_number}: the router sees {num_rows} "
                             f"tokens, the modality mask has {current.numel()}")
        rows = (current.to(logits.device) == IMAGE, self.modality.has_image())
        if self.training:  # a checkpointed forward runs without grad: keep its mask too
            self._forward_rows = rows
        return rows

    def _image_rpv_totals(self, rpv: torch.Tensor, is_image: torch.Tensor) -> torch.Tensor:
        """(sum, count) of image RPVs over the global micro-batch (training) or this rank."""
        totals = ltdr_math.image_rpv_totals(rpv, is_image)
        group = self.tp_dp_cp_group
        if self.training and group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(totals, group=group)
        return totals

    def _route_tail_wider(self, flat, probs, routing_map, tail):
        wide_probs, wide_map = moe_utils.topk_routing_with_score_function(
            flat, self.top_a,
            use_pre_softmax=self.config.moe_router_pre_softmax,
            scaling_factor=self.config.moe_router_topk_scaling_factor,
            score_function=self.score_function,
            expert_bias=self.expert_bias,
            fused=self.config.moe_router_fusion,
        )
        probs, routing_map = ltdr_math.merge_tail_rows(probs, routing_map, wide_probs, wide_map,
                                                       tail)
        if self.config.moe_expert_capacity_factor is not None:
            probs, routing_map = moe_utils.apply_router_token_dropping(
                probs, routing_map, router_topk=self.topk,
                capacity_factor=self.config.moe_expert_capacity_factor,
                drop_policy=self.config.moe_token_drop_policy,
                pad_to_capacity=self.config.moe_pad_expert_input_to_capacity,
            )
        return probs, routing_map

    def _record(self, flat, is_image, tail, routing_map, totals, left_out) -> None:
        """Keep this forward's flags for tests and add to the layer's metric sums."""
        self.ltdr_last = LTDRReport(is_image=is_image, tail=tail, routing_map=routing_map.detach(),
                                    threshold=ltdr_math.tail_threshold(totals))
        if not self.training or _inside_backward():
            return
        with torch.no_grad():
            text_loss, has_text = self._text_balance_loss(flat.detach(), left_out)
            self.ltdr_sums.add(image_tokens=is_image.sum(), tail_tokens=tail.sum(),
                               image_pairs=ltdr_math.routed_pairs_of(routing_map, is_image),
                               text_loss=text_loss, text_forwards=has_text)

    def _text_balance_loss(self, flat: torch.Tensor, left_out: torch.Tensor):
        """megatron's aux_loss (coefficient 1) over the text tokens (``left_out``: image and
        padding, [T] bool); (loss, 1 or 0)."""
        aux_map, scores = moe_utils.compute_routing_scores_for_aux_loss(
            flat, self.topk, self.score_function, fused=self.config.moe_router_fusion,
            padding_mask=left_out)
        tokens_per_expert, _, total = moe_utils.get_tokens_per_expert_and_token_count(
            aux_map, reduce_group=self.tp_cp_group, topk=self.topk, with_padding_mask=True)
        loss = moe_utils.switch_load_balancing_loss_func(
            scores, tokens_per_expert, total, self.topk, self.config.num_moe_experts, 1.0,
            fused=self.config.moe_router_fusion)
        has_text = total > 0
        return torch.where(has_text, loss, torch.zeros_like(loss)), has_text


class STGCLTDRRouter(STGCRouter, LTDRRouter):
    """STGC around LTDR: STGC's record sees (and judges) the routing map LTDR returns."""
