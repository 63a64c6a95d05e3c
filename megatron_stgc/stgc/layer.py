"""STGCMoELayer: megatron-core's MoELayer with STGC attached through hooks.

The layer runs megatron-core's own forward, untouched, in every supported version.
STGC attaches at three public surfaces:
  * the router (``STGCRouter``, a TopKRouter subclass from the spec's MoESubmodules)
    starts each forward's ConflictRecord and wraps the logits (see router.py);
  * a forward pre-hook on the experts module passes the dispatched rows and their
    probs through ``_AfterExpertsBackward``, an identity whose backward runs once the
    local experts' backward is complete. There the expert side computes every row's
    cos(g_n, g_mean) and sends it back to the token's own rank, in time for the
    router's backward;
  * forward hooks on the experts' linears capture inputs and output gradients
    (capture.py).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_stgc.stgc.capture import (LINEAR_NAMES, attach_capture_hooks,
                                        expert_linear_has_bias, weight_grads_match_captures)
from megatron_stgc.stgc.config import STGCConfig
from megatron_stgc.stgc.expert_side import expert_row_cosines
from megatron_stgc.stgc.mean_source import EarlyMeanReduce, group_size, reduce_dtype
from megatron_stgc.stgc.record import APPLY, ConflictRecord, LayerSTGCState
from megatron_stgc.stgc.return_route import snapshot_return_route
from megatron_stgc.stgc.router import STGCRouter
from megatron_stgc.stgc.step_grads import reduced_expert_grads

# megatron-core config switches whose code paths STGC's hooks cannot follow: each one
# (getattr default False, so a version without the switch passes) with the reason.
_UNSUPPORTED_SWITCHES = {
    "moe_pad_expert_input_to_capacity": "padded rows are not tokens; token dropping with "
                                        "--moe-expert-capacity-factor alone is supported",
    "moe_shared_expert_overlap": "the shared expert runs inside the dispatcher",
    "moe_latent_size": "MoE latent projections change what the experts see",
    "calculate_per_token_loss": "L_token is a mean over conflicting pairs; its per-token-loss "
                                "scaling is not implemented",
    "overlap_dispatch_backward_with_experts_wgrad": "expert weight gradients would arrive after "
                                                    "STGC's expert-side backward",
    "delay_wgrad_compute": "expert weight gradients would arrive after STGC's expert-side "
                           "backward",
    "use_transformer_engine_op_fuser": "the fused expert op bypasses the linears STGC hooks",
}


def check_supported(config) -> None:
    """Configurations STGC cannot handle fail at build time, naming the setting."""
    for name, reason in _UNSUPPORTED_SWITCHES.items():
        if getattr(config, name, None):
            raise ValueError(f"STGC does not support {name} ({reason})")
    if config.expert_tensor_parallel_size not in (None, 1):
        raise ValueError("STGC supports --expert-tensor-parallel-size 1 only")
    if config.moe_token_dispatcher_type not in ("alltoall", "allgather"):
        raise ValueError(f"STGC supports the alltoall and allgather token dispatchers, not "
                         f"{config.moe_token_dispatcher_type!r} (--moe-token-dispatcher-type)")
    if getattr(config, "enable_cuda_graph", False) or \
            getattr(config, "cuda_graph_impl", "none") not in (None, "none"):
        raise ValueError("STGC does not support CUDA graphs (its hooks would run only while "
                         "the graph is captured)")
    if getattr(config, "context_parallel_size", 1) != 1:
        raise ValueError("STGC is not tested with context parallelism (context_parallel_size > 1)")


def expert_data_parallel_group(pg_collection):
    """megatron's expert-data-parallel group: the replicas of this rank's experts."""
    if pg_collection is None:
        from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

        pg_collection = get_default_pg_collection()
    return pg_collection.expt_dp


class STGCMoELayer(MoELayer):
    """MoELayer whose router also receives the conflict elimination loss gradient.

    After each backward, ``layer.stgc.last`` (an STGCReport) holds the per-pair
    cosines and conflict flags of this rank's tokens, aligned with the routing map.
    Constructor arguments are megatron-core's (whatever the version passes) plus
    ``stgc_config``.
    """

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None,
                 stgc_config: STGCConfig | None = None, **mcore_kwargs):
        check_supported(config)
        super().__init__(config, submodules, layer_number=layer_number,
                         pg_collection=pg_collection, **mcore_kwargs)
        if not isinstance(self.router, STGCRouter):
            raise TypeError("STGCMoELayer needs MoESubmodules(router=STGCRouter)")
        self.stgc = LayerSTGCState(config=stgc_config or STGCConfig(enabled=True))
        self.stgc.layer_number = layer_number
        self.router.stgc = self.stgc
        self.expert_dp_group = expert_data_parallel_group(pg_collection)
        self._linear_has_bias = expert_linear_has_bias(self.experts)
        if not hasattr(self.experts, "local_experts") and any(self._linear_has_bias.values()):
            raise NotImplementedError(
                "STGC supports biased experts with SequentialMLP (local spec) only; grouped-GEMM "
                "experts need add_bias_linear=False"
            )
        self._reuses_weight_grads = weight_grads_match_captures(config)
        self._hook_handles = attach_capture_hooks(
            self.experts, self._current_capture, reuse_weight_grads=self._reuses_weight_grads,
        )
        self._hook_handles.append(
            self.experts.register_forward_pre_hook(self._join_expert_inputs, with_kwargs=True)
        )

    def set_layer_number(self, layer_number: int):
        super().set_layer_number(layer_number)
        self.stgc.layer_number = layer_number

    def _current_capture(self):
        record = self.stgc.current
        return None if record is None or record.mode == APPLY else record.capture

    def _join_expert_inputs(self, experts, args, kwargs):
        """Forward pre-hook on the experts: (dispatched rows, probs) through the join node."""
        record = self.stgc.current
        if record is None or record.mode == APPLY:
            return None
        dispatched, tokens_per_expert, permuted_probs = args[:3]
        record.return_route = snapshot_return_route(self.token_dispatcher)
        record.tokens_per_expert = [int(n) for n in tokens_per_expert]
        record.capture.early_reduce = self._early_mean_reduce()
        record.row_probs = permuted_probs.detach()
        dispatched, permuted_probs = _AfterExpertsBackward.apply(
            dispatched, permuted_probs, self, record
        )
        return (dispatched, tokens_per_expert, permuted_probs, *args[3:]), kwargs

    def _early_mean_reduce(self) -> EarlyMeanReduce | None:
        """Overlapped all-reduce of G for the micro-batch sources, where the hooks see every
        weight gradient (one module per expert, no gradient-accumulation fusion)."""
        config = self.stgc.config
        if not (config.overlap_mean_reduce and self._reuses_weight_grads
                and config.mean_source in ("micro-batch", "micro-batch-bf16")
                and hasattr(self.experts, "local_experts")
                and group_size(self.expert_dp_group) > 1):
            return None
        names = LINEAR_NAMES[-1:] if config.estimator == "fc2" else LINEAR_NAMES
        return EarlyMeanReduce(self.expert_dp_group, reduce_dtype(config.mean_source), names)

    def remember_step_grads(self) -> None:
        """Keep this step's reduced expert gradients for the next step (previous-step source).

        Call after megatron's DDP reduced the step's gradients, before the next step zeroes
        them (training/stgc_hooks.py does)."""
        self.stgc.previous_step_grads = reduced_expert_grads(self.experts)

    def find_conflicts(self, record: ConflictRecord) -> None:
        """Expert side, in backward: per-row cosines -> record.cos_map on the router rank."""
        experts = record.capture.per_expert_linears(
            record.tokens_per_expert,
            record.row_probs,
            self._linear_has_bias,
            fc2_bias_scaled_by_prob=not self.config.moe_apply_probs_on_input,
        )
        early_reduce = record.capture.early_reduce
        record.release_capture()
        config = self.stgc.config
        if self.stgc.audit is not None:
            self.stgc.audit.add_micro_batch(experts, self.expert_dp_group)
        mean_source = self.stgc.mean_source_now(record.row_probs.device)
        result = expert_row_cosines(
            experts,
            record.row_probs,
            self.expert_dp_group,
            estimator=config.estimator,
            rank=config.estimator_rank,
            seed=int(self.layer_number or 0),
            with_consistency=self.stgc.collect_consistency,
            mean_source=mean_source,
            previous=self.stgc.previous_step_grads,
            early=early_reduce,
        )
        if early_reduce is not None and early_reduce.used:
            self.stgc.overlapped_backwards += 1
        record.cos_map = record.return_route.to_router_ranks(result.row_cos)
        record.return_route = None
        if result.consistency is not None:
            self.stgc.sums.add_consistency(result.consistency)


class _AfterExpertsBackward(torch.autograd.Function):
    """Identity on (dispatched rows, their probs); backward = experts' backward is done."""

    @staticmethod
    def forward(ctx, dispatched, probs, layer: STGCMoELayer, record: ConflictRecord):
        ctx.layer, ctx.record = layer, record
        return dispatched.view_as(dispatched), probs.view_as(probs)

    @staticmethod
    def backward(ctx, grad_dispatched, grad_probs):
        ctx.layer.find_conflicts(ctx.record)
        ctx.layer = ctx.record = None
        return grad_dispatched, grad_probs, None, None
