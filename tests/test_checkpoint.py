"""Resume with the distributed optimizer and BF16 params continues exactly (EP=2, 2 ranks)."""

from __future__ import annotations

import pytest

from dist_utils import build_tiny, rank_micro_batches, run_on_ranks, synthetic_global_batch, tiny_config

STEPS, RESTART_AT = 5, 2


def _losses(objects, steps):
    from megatron_stgc.training.step import train_step

    out = []
    for step in steps:
        batches = rank_micro_batches(synthetic_global_batch(8, 16, seed=step), 2)
        result = train_step(objects.model, objects.optimizer, objects.scheduler, iter(batches),
                            len(batches), 2, 16)
        out.append((float(result.losses[0]["lm_loss"][0]), result.grad_norm))
    return out


def _straight_and_resumed(rank, world_size, root, distributed_optimizer, bf16):
    from megatron.core import parallel_state

    from megatron_stgc.training.checkpoint import TrainProgress, load_checkpoint, save_checkpoint

    config = tiny_config(2, use_distributed_optimizer=distributed_optimizer, bf16=bf16,
                         global_batch_size=8, micro_batch_size=2, train_iters=STEPS,
                         lr_warmup_fraction=0.2)
    straight = _losses(build_tiny(config), range(STEPS))
    parallel_state.destroy_model_parallel()

    first = build_tiny(config)
    resumed = _losses(first, range(RESTART_AT))
    save_checkpoint(root, first.model, first.optimizer, first.scheduler,
                    TrainProgress(RESTART_AT, RESTART_AT * 8))
    parallel_state.destroy_model_parallel()

    second = build_tiny(config)
    progress = load_checkpoint(root, second.model, second.optimizer, second.scheduler)
    resumed += _losses(second, range(progress.iteration, STEPS))
    return straight, resumed


@pytest.mark.parametrize("distributed_optimizer,bf16", [(True, True), (True, False)],
                         ids=["distopt-bf16", "distopt-fp32"])
def test_resume_is_exact(tmp_path, distributed_optimizer, bf16):
    for straight, resumed in run_on_ranks(_straight_and_resumed, 2, str(tmp_path),
                                          distributed_optimizer, bf16):
        assert straight == resumed


def _data_state_round_trip(rank, world_size, root):
    from megatron.core import parallel_state

    from megatron_stgc.training.checkpoint import TrainProgress, load_checkpoint, save_checkpoint

    config = tiny_config(2, global_batch_size=8, micro_batch_size=2, train_iters=STEPS)
    first = build_tiny(config)
    _losses(first, range(1))  # the optimizer has state to save
    mine = {"bad_samples": {"counts": {"corrupt_image": rank + 1},
                            "examples": {"corrupt_image": [f"r{rank}"]}},
            "truncated": 10 * rank, "bad_records": [rank, 7]}
    save_checkpoint(root, first.model, first.optimizer, first.scheduler, TrainProgress(1, 8),
                    data_state=mine)
    parallel_state.destroy_model_parallel()
    second = build_tiny(config)
    restored = []
    load_checkpoint(root, second.model, second.optimizer, second.scheduler,
                    restore_data_state=restored.append)
    return mine, restored


def test_each_rank_gets_its_own_data_state_back(tmp_path):
    """The LLaVA data set's bad-sample counters ride in the checkpoint, one per rank."""
    for mine, restored in run_on_ranks(_data_state_round_trip, 2, str(tmp_path)):
        assert restored == [mine]
