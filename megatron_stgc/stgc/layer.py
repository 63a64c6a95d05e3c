"""STGCMoELayer: megatron-core's MoELayer with STGC attached.

Forward is megatron-core's, plus three attachments:
  * ``route``: starts this forward's ConflictRecord (also inside activation
    recompute, which re-runs ``route``);
  * forward hooks on the experts' linears capture inputs and output gradients;
  * ``routed_experts_compute``: the dispatched rows and their probs pass through
    ``_AfterExpertsBackward``, an identity whose backward runs once the local
    experts' backward is complete. There the expert side computes every row's
    cos(g_n, g_mean) and sends it back to the token's own rank, in time for the
    router's backward (see router.py).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules

from megatron_stgc.stgc.capture import attach_capture_hooks, expert_linear_has_bias
from megatron_stgc.stgc.config import STGCConfig
from megatron_stgc.stgc.expert_side import expert_row_cosines
from megatron_stgc.stgc.record import APPLY, ConflictRecord, LayerSTGCState
from megatron_stgc.stgc.return_route import snapshot_route
from megatron_stgc.stgc.router import STGCRouter


def check_supported(config) -> None:
    """Configurations STGC cannot handle fail at build time, naming the flag."""
    if config.moe_pad_expert_input_to_capacity:
        raise ValueError(
            "STGC does not support --moe-pad-expert-input-to-capacity (padded rows are not "
            "tokens); token dropping with --moe-expert-capacity-factor alone is supported"
        )
    if config.expert_tensor_parallel_size not in (None, 1):
        raise ValueError("STGC supports --expert-tensor-parallel-size 1 only")
    if config.moe_shared_expert_overlap:
        raise ValueError("STGC does not support --moe-shared-expert-overlap")
    if config.moe_latent_size:
        raise ValueError("STGC does not support MoE latent projections (--moe-latent-size)")


class STGCMoELayer(MoELayer):
    """MoELayer whose router also receives the conflict elimination loss gradient.

    After each backward, ``layer.stgc.last`` (an STGCReport) holds the per-pair
    cosines and conflict flags of this rank's tokens, aligned with the routing map.
    """

    def __init__(self, config, submodules: MoESubmodules, layer_number=None,
                 pg_collection=None, stgc_config: STGCConfig | None = None):
        check_supported(config)
        super().__init__(config, submodules, layer_number=layer_number, pg_collection=pg_collection)
        if not isinstance(self.router, STGCRouter):
            raise TypeError("STGCMoELayer needs MoESubmodules(router=STGCRouter)")
        self.stgc = LayerSTGCState(config=stgc_config or STGCConfig(enabled=True))
        self.stgc.layer_number = layer_number
        self.router.stgc = self.stgc
        self._expert_dp_group = self.experts.dp_group if hasattr(self.experts, "dp_group") else None
        self._linear_has_bias = expert_linear_has_bias(self.experts)
        if not hasattr(self.experts, "local_experts") and any(self._linear_has_bias.values()):
            raise NotImplementedError(
                "STGC supports biased experts with SequentialMLP (local spec) only; grouped-GEMM "
                "experts need add_bias_linear=False"
            )
        self._capture_handles = attach_capture_hooks(
            self.experts, self._current_capture,
            reuse_weight_grads=not config.gradient_accumulation_fusion,
        )

    def set_layer_number(self, layer_number: int):
        super().set_layer_number(layer_number)
        self.stgc.layer_number = layer_number

    def _current_capture(self):
        record = self.stgc.current
        return None if record is None or record.mode == APPLY else record.capture

    def route(self, hidden_states, padding_mask=None):
        self.stgc.begin_forward(self.training)
        return super().route(hidden_states, padding_mask)

    def routed_experts_compute(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        dispatched, tokens_per_expert, permuted_probs = self.token_dispatcher.dispatch_postprocess(
            hidden_states, probs
        )
        record = self.stgc.current
        if record is not None and record.mode != APPLY:
            record.route = snapshot_route(self.token_dispatcher)
            record.tokens_per_expert = [int(n) for n in tokens_per_expert]
            record.row_probs = permuted_probs.detach()
            dispatched, permuted_probs = _AfterExpertsBackward.apply(
                dispatched, permuted_probs, self, record
            )
        expert_output, mlp_bias = self.experts(dispatched, tokens_per_expert, permuted_probs)
        assert mlp_bias is None, f"mlp_bias is not supported for {type(self.token_dispatcher)}"
        return self.token_dispatcher.combine_preprocess(expert_output), mlp_bias

    def find_conflicts(self, record: ConflictRecord) -> None:
        """Expert side, in backward: per-row cosines -> record.cos_map on the router rank."""
        experts = record.capture.per_expert_linears(
            record.tokens_per_expert,
            record.row_probs,
            self._linear_has_bias,
            fc2_bias_scaled_by_prob=not self.config.moe_apply_probs_on_input,
        )
        config = self.stgc.config
        result = expert_row_cosines(
            experts,
            record.row_probs,
            self._expert_dp_group,
            estimator=config.estimator,
            rank=config.estimator_rank,
            seed=int(self.layer_number or 0),
            with_consistency=self.stgc.collect_consistency,
        )
        record.capture.closed = True
        record.capture = None
        record.cos_map = record.route.to_router_ranks(result.row_cos)
        if result.consistency is not None:
            defined = ~torch.isnan(result.consistency)
            self.stgc.sums.consistency_sum += float(result.consistency[defined].sum())
            self.stgc.sums.consistency_count += int(defined.sum())


class _AfterExpertsBackward(torch.autograd.Function):
    """Identity on (dispatched rows, their probs); backward = experts' backward is done."""

    @staticmethod
    def forward(ctx, dispatched, probs, layer: STGCMoELayer, record: ConflictRecord):
        ctx.layer, ctx.record = layer, record
        return dispatched.view_as(dispatched), probs.view_as(probs)

    @staticmethod
    def backward(ctx, grad_dispatched, grad_probs):
        ctx.layer.find_conflicts(ctx.record)
        return grad_dispatched, grad_probs, None, None
