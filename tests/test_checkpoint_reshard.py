"""Resuming at another expert-parallel size (issue 24 part 5), on 2 gloo ranks: a checkpoint
saved at EP 2 x DP 1 and loaded at EP 1 x DP 2.

* With the optimizer state (plain and distributed optimizer): megatron-core cannot map it
  (the optimizer is split per parallel group and the split changes with EP), and
  load_checkpoint stops before the load with a CheckpointLayoutError that names
  --no-load-optim, on every rank (no hang).
* With --no-load-optim: the weights, iteration and data position load, and the next steps'
  losses equal those of an EP 1 run whose weights were copied by hand from the EP 2 run's
  full parameters (the slow reference), and differ from the uninterrupted EP 2 run's only
  by what the fresh Adam state changes.
"""

from __future__ import annotations

import pytest
import torch

from dist_utils import build_tiny, run_on_ranks, tiny_config
from test_checkpoint import _losses

SAVED_AT = 2


def _full_params(objects) -> dict[str, torch.Tensor]:
    """{name: tensor} of the whole model: the local experts renamed to their global index
    and gathered from the expert-parallel ranks."""
    import torch.distributed as dist

    from dist_utils import named_global_tensors

    local = {name: value.detach().clone()
             for name, value in named_global_tensors(objects.model[0].module).items()}
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return {name: value for part in parts for name, value in part.items()}


def _config(expert_parallel: int, distributed_optimizer: bool):
    return tiny_config(expert_parallel, global_batch_size=8, micro_batch_size=2, train_iters=6,
                       lr_warmup_fraction=0.0, use_distributed_optimizer=distributed_optimizer)


def _save_at_ep2_load_at_ep1(rank, world_size, root, distributed_optimizer):
    from megatron.core import parallel_state

    from megatron_stgc.training.checkpoint import (CheckpointLayoutError, TrainProgress,
                                                   load_checkpoint, save_checkpoint)

    first = build_tiny(_config(2, distributed_optimizer))
    _losses(first, range(SAVED_AT))
    save_checkpoint(root, first.model, first.optimizer, first.scheduler,
                    TrainProgress(SAVED_AT, SAVED_AT * 8))
    saved = _full_params(first)
    parallel_state.destroy_model_parallel()

    second = build_tiny(_config(1, distributed_optimizer))
    with pytest.raises(CheckpointLayoutError) as refused:
        load_checkpoint(root, second.model, second.optimizer, second.scheduler)
    parallel_state.destroy_model_parallel()  # a refused run stops; start a fresh one
    second = build_tiny(_config(1, distributed_optimizer))
    progress = load_checkpoint(root, second.model, second.optimizer, second.scheduler,
                               load_optim=False)
    loaded = _full_params(second)
    resumed = _losses(second, range(SAVED_AT, SAVED_AT + 2))
    parallel_state.destroy_model_parallel()

    reference = build_tiny(_config(1, distributed_optimizer))  # weights copied by hand
    with torch.no_grad():
        for name, param in reference.model[0].module.named_parameters():
            param.copy_(saved[name])
    by_hand = _losses(reference, range(SAVED_AT, SAVED_AT + 2))
    parallel_state.destroy_model_parallel()
    same = all(torch.equal(loaded[name], saved[name]) for name in saved)
    return str(refused.value), progress.iteration, same, resumed, by_hand


@pytest.mark.parametrize("distributed_optimizer", [False, True])
def test_an_ep_change_refuses_the_optimizer_state_and_loads_without_it(tmp_path,
                                                                        distributed_optimizer):
    results = run_on_ranks(_save_at_ep2_load_at_ep1, 2, str(tmp_path / "ckpt"),
                           distributed_optimizer)
    for message, iteration, same_weights, resumed, by_hand in results:
        assert "--no-load-optim" in message and "another parallel layout" in message, message
        assert iteration == SAVED_AT and same_weights
        for (loss, norm), (ref_loss, ref_norm) in zip(resumed, by_hand):
            assert loss == pytest.approx(ref_loss, rel=1e-6)
            assert norm == pytest.approx(ref_norm, rel=1e-5)
