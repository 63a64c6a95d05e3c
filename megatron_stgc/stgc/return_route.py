"""Send per-(token, expert) values from the expert's rank back to the token's rank.

In forward, megatron-core's dispatcher moves token rows from the router rank to the
rank that owns the expert. STGC computes one value per dispatched row (the cosine)
on the expert side and needs it on the router side as a [tokens, experts] map.
The routes below replay the dispatcher's combine path (unsort chunks, reverse
all-to-all / reduce-scatter) on that value vector, using the dispatcher state
snapshotted at forward time, so the backward of one micro-batch never reads the
state of another (pipeline schedules, activation recompute).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.tensor_parallel import (
    all_to_all,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.moe.moe_utils import sort_chunks_by_idxs
from megatron.core.transformer.moe.token_dispatcher import (
    MoEAllGatherTokenDispatcher,
    MoEAlltoAllTokenDispatcher,
)


def pairs_to_map(row_values: torch.Tensor, routing_map: torch.Tensor) -> torch.Tensor:
    """Rows in megatron's permute order (expert-major) -> [tokens, experts], NaN elsewhere.

    row_values: [R] one value per routed pair, ordered expert by expert and, within
    an expert, by token index (moe_utils.permute's order).
    routing_map: [T, E] bool.
    No boolean indexing (it would sync with the host): each routed pair's row is its rank
    among the routed pairs in expert-major order, a cumulative sum.
    """
    routed = routing_map.t().reshape(-1)  # [E*T], expert-major
    nan = torch.full((), float("nan"), dtype=row_values.dtype, device=row_values.device)
    if row_values.numel() == 0:
        return nan.expand(routing_map.shape).clone()
    row_of_pair = (torch.cumsum(routed.to(torch.long), dim=0) - 1).clamp(min=0)
    by_expert = torch.where(routed, row_values[row_of_pair], nan)
    return by_expert.view(routing_map.shape[1], routing_map.shape[0]).t()


@dataclass
class AllToAllRoute:
    """What the alltoall dispatcher knew when it dispatched one micro-batch."""

    routing_map: torch.Tensor  # [T_local, E] the rows this rank permuted and sent
    num_local_experts: int
    chunk_sizes: torch.Tensor | None  # tokens per (local expert, source rank) chunk
    restore_chunk_order: torch.Tensor
    ep_group: object
    ep_size: int
    input_splits: object
    output_splits: object
    tp_group: object
    tp_size: int
    output_splits_tp: object

    @classmethod
    def snapshot(cls, dispatcher: MoEAlltoAllTokenDispatcher) -> "AllToAllRoute":
        chunk_sizes = None
        if dispatcher.num_local_experts > 1:
            chunk_sizes = dispatcher.num_global_tokens_per_local_expert.T.ravel()
        return cls(
            routing_map=dispatcher.routing_map,
            num_local_experts=dispatcher.num_local_experts,
            chunk_sizes=chunk_sizes,
            restore_chunk_order=dispatcher.restore_output_by_local_experts,
            ep_group=dispatcher.ep_group,
            ep_size=dispatcher.ep_size,
            input_splits=dispatcher.input_splits,
            output_splits=dispatcher.output_splits,
            tp_group=dispatcher.tp_group,
            tp_size=dispatcher.tp_size,
            output_splits_tp=dispatcher.output_splits_tp,
        )

    def to_router_ranks(self, row_values: torch.Tensor) -> torch.Tensor:
        """[R_expert_rank] values in the experts' row order -> [T_local, E] on the router rank."""
        values = row_values[:, None]
        if self.num_local_experts > 1:
            values, _ = sort_chunks_by_idxs(values, self.chunk_sizes, self.restore_chunk_order)
        if self.tp_size > 1:
            # Every expert-TP rank holds the same (already all-reduced) values; the
            # combine path sums them, so divide the copies out again.
            splits = None if self.output_splits_tp is None else list(self.output_splits_tp)
            values = reduce_scatter_to_sequence_parallel_region(
                values, group=self.tp_group, input_split_sizes=splits
            ) / self.tp_size
        if self.ep_size > 1:
            values = all_to_all(self.ep_group, values, self.input_splits, self.output_splits)
        return pairs_to_map(values[:, 0], self.routing_map)


@dataclass
class AllGatherRoute:
    """What the allgather dispatcher knew when it dispatched one micro-batch."""

    local_map: torch.Tensor  # [T_global, local_E] routing of all gathered tokens to local experts
    first_local_expert: int
    num_experts: int
    tp_ep_group: object
    tp_size: int
    ep_size: int

    @classmethod
    def snapshot(cls, dispatcher: MoEAllGatherTokenDispatcher) -> "AllGatherRoute":
        return cls(
            local_map=dispatcher.local_map,
            first_local_expert=dispatcher.local_expert_indices[0],
            num_experts=dispatcher.config.num_moe_experts,
            tp_ep_group=dispatcher.tp_ep_group,
            tp_size=dispatcher.tp_size,
            ep_size=dispatcher.ep_size,
        )

    def to_router_ranks(self, row_values: torch.Tensor) -> torch.Tensor:
        local_values = pairs_to_map(row_values, self.local_map)  # [T_global, local_E]
        total = torch.zeros(
            self.local_map.shape[0], self.num_experts, dtype=row_values.dtype,
            device=row_values.device,
        )
        first, last = self.first_local_expert, self.first_local_expert + self.local_map.shape[1]
        # Pairs not routed here contribute 0 to the sum; NaN (routed, not judged) survives it.
        total[:, first:last] = torch.where(self.local_map, local_values, 0.0)
        if self.tp_size * self.ep_size > 1:
            total = reduce_scatter_to_sequence_parallel_region(total, group=self.tp_ep_group)
            total = total / self.tp_size
        return total


def snapshot_return_route(dispatcher):
    """The return route for the dispatcher type megatron-core built."""
    if isinstance(dispatcher, MoEAlltoAllTokenDispatcher):
        return AllToAllRoute.snapshot(dispatcher)
    if isinstance(dispatcher, MoEAllGatherTokenDispatcher):
        return AllGatherRoute.snapshot(dispatcher)
    raise NotImplementedError(
        f"STGC supports the alltoall and allgather token dispatchers, not {type(dispatcher).__name__}"
        " (--moe-token-dispatcher-type)"
    )
