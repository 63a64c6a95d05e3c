"""STGC is parallel-layout invariant: same flags and router gradients on every layout."""

import pytest
import torch
import torch.distributed as dist

from megatron.core import parallel_state

from dist_utils import run_on_ranks
from stgc_utils import (
    STGCConfig,
    build_stgc_layer,
    global_layer_state,
    init_single_process,
    load_global_state,
    moe_config,
)

SEQ, BATCH, HIDDEN = 32, 4, 16  # 128 tokens in the global micro-batch


def _global_batch():
    gen = torch.Generator().manual_seed(11)
    return torch.randn(SEQ, BATCH, HIDDEN, generator=gen), torch.randn(SEQ, BATCH, HIDDEN, generator=gen)


def _step_on_rank(rank, world, expert_parallel, config_overrides, state):
    """One forward/backward of this rank's share of the global micro-batch."""
    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=expert_parallel)
    config = moe_config(**config_overrides)
    layer = build_stgc_layer(config, STGCConfig(enabled=True, beta=1.0))
    load_global_state(layer, state)
    hidden, weights = _global_batch()
    share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    hidden, weights = hidden[:, share].contiguous(), weights[:, share].contiguous()
    out, _ = layer(hidden)
    # Mean over local tokens; DDP averages over ranks -> mean over the global batch.
    ((out * weights).sum() / out[..., 0].numel()).backward()
    router_grad = layer.router.weight.grad.clone()
    dist.all_reduce(router_grad)
    router_grad /= world
    report = layer.stgc.last
    return {"out": out.detach(), "cos": report.cos, "conflicts": report.conflicts,
            "router_grad": router_grad}


def _reference(config_overrides, state):
    return run_on_ranks(_step_on_rank, 1, 1, config_overrides, state)[0]


def _rows_of(tensor_tbe, rank, world):
    """[S*B, E] world-1 rows -> the rows of `rank`'s batch share."""
    per = BATCH // world
    return tensor_tbe.reshape(SEQ, BATCH, -1)[:, rank * per:(rank + 1) * per].reshape(SEQ * per, -1)


LAYOUTS = [
    # (world size, EP size, dispatcher)
    (2, 2, "alltoall"),
    (2, 2, "allgather"),
    (2, 1, "alltoall"),  # DP=2 x EP=1: expert gradients averaged over two replicas
    (4, 2, "alltoall"),  # DP=2 x EP=2
]


@pytest.mark.parametrize("world,ep,dispatcher", LAYOUTS)
def test_flags_and_router_grads_match_world_one(world, ep, dispatcher):
    overrides = dict(moe_router_topk=2, moe_token_dispatcher_type=dispatcher, gated_linear_unit=True)
    init_single_process()
    state = global_layer_state(moe_config(**overrides))
    reference = _reference(overrides, state)
    results = run_on_ranks(_step_on_rank, world, ep, overrides, state)

    assert reference["conflicts"].any(), "test needs conflicting pairs"
    for rank, result in enumerate(results):
        ref_cos = _rows_of(reference["cos"], rank, world)
        assert torch.equal(torch.isnan(result["cos"]), torch.isnan(ref_cos))
        judged = ~torch.isnan(ref_cos)
        assert torch.allclose(result["cos"][judged], ref_cos[judged], atol=1e-5)
        assert torch.equal(result["conflicts"], _rows_of(reference["conflicts"], rank, world))
        assert torch.allclose(result["router_grad"], reference["router_grad"], atol=1e-6, rtol=1e-5)
