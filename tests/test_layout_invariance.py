"""Expert/data-parallel layouts give the same losses, gradients and updates as one process.

In megatron-core, expert parallelism is carved out of data parallelism: with
world size W (TP=1) every rank is a data-parallel rank and processes its own
slice of the global batch. So a W-rank run is compared with a one-process
run that processes the same global batch as W micro-batches (the same
slices, in rank order) with gradient accumulation. The MoE aux loss is off
(coefficient 0) because megatron-core computes it per rank over local tokens,
which is not invariant to the layout.
"""

from __future__ import annotations


import pytest
import torch

from dist_utils import (build_tiny, load_full_state, named_global_tensors, rank_micro_batches,
                        run_on_ranks, save_full_state, synthetic_global_batch, tiny_config)

GLOBAL_BATCH = 8
SEQ = 16
STEPS = 2


def _layout_config(world_size: int, expert_parallel: int, dispatcher: str, micro_batches: int):
    data_parallel = world_size  # TP = 1
    return tiny_config(expert_parallel, dispatcher, seq_length=SEQ,
                       global_batch_size=GLOBAL_BATCH,
                       micro_batch_size=GLOBAL_BATCH // (data_parallel * micro_batches),
                       clip_grad=0.0, lr=1e-2, min_lr=1e-2, lr_decay_style="constant")


def _save_initial_weights(rank, world_size, path):
    objects = build_tiny(_layout_config(1, 1, "alltoall", 1))
    save_full_state(objects.unwrapped_model, path)


def _train_layout(rank, world_size, expert_parallel, dispatcher, micro_batches, weights):
    from megatron_stgc.training.step import train_step

    config = _layout_config(world_size, expert_parallel, dispatcher, micro_batches)
    objects = build_tiny(config)
    load_full_state(objects.unwrapped_model, weights)
    history = []
    for step in range(STEPS):
        batches = rank_micro_batches(synthetic_global_batch(GLOBAL_BATCH, SEQ, seed=step),
                                     config.training.micro_batch_size)
        result = train_step(objects.model, objects.optimizer, objects.scheduler, iter(batches),
                            len(batches), config.training.micro_batch_size, SEQ)
        history.append({
            "losses": [float(m["lm_loss"][0] / m["lm_loss"][1]) for m in result.losses],
            "grads": named_global_tensors(objects.model[0], "grad"),
            "grad_norm": result.grad_norm,
        })
    history.append({"params": named_global_tensors(objects.model[0], "param")})
    return history


def _merge_ranks(per_rank: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Union of the ranks' tensors; names present on several ranks must agree."""
    merged: dict[str, torch.Tensor] = {}
    for tensors in per_rank:
        for name, tensor in tensors.items():
            if name in merged:
                torch.testing.assert_close(tensor, merged[name], rtol=1e-5, atol=1e-6,
                                           msg=f"ranks disagree on {name}")
            else:
                merged[name] = tensor
    return merged


def _assert_same_run(layout_history: list[list[dict]], reference: list[dict]) -> None:
    """layout_history[rank][step] vs reference[step] (one rank, micro-batch per layout rank)."""
    for step in range(STEPS):
        layout_losses = [loss for rank in layout_history for loss in rank[step]["losses"]]
        torch.testing.assert_close(torch.tensor(layout_losses),
                                   torch.tensor(reference[step]["losses"]), rtol=1e-5, atol=1e-6)
        grads = _merge_ranks([rank[step]["grads"] for rank in layout_history])
        assert set(grads) == set(reference[step]["grads"])
        for name, grad in reference[step]["grads"].items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6,
                                       msg=f"step {step} gradient of {name}")
        assert layout_history[0][step]["grad_norm"] == pytest.approx(
            reference[step]["grad_norm"], rel=1e-5)
    params = _merge_ranks([rank[-1]["params"] for rank in layout_history])
    for name, value in reference[-1]["params"].items():
        torch.testing.assert_close(params[name], value, rtol=1e-4, atol=1e-5,
                                   msg=f"parameter {name} after {STEPS} steps")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("layout") / "initial.pt")
    run_on_ranks(_save_initial_weights, 1, path)
    return path


@pytest.fixture(scope="module")
def reference_two_slices(weights):
    return run_on_ranks(_train_layout, 1, 1, "alltoall", 2, weights)[0]


@pytest.fixture(scope="module")
def reference_four_slices(weights):
    return run_on_ranks(_train_layout, 1, 1, "alltoall", 4, weights)[0]


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_ep2_matches_single_process(dispatcher, weights, reference_two_slices):
    """World 2, EP=2 (dense DP=2, expert DP=1) == world 1 with the same two halves."""
    history = run_on_ranks(_train_layout, 2, 2, dispatcher, 1, weights)
    _assert_same_run(history, reference_two_slices)


def test_dp2_ep1_matches_single_process(weights, reference_two_slices):
    """World 2, EP=1 (experts replicated, DP=2) == world 1."""
    history = run_on_ranks(_train_layout, 2, 1, "alltoall", 1, weights)
    _assert_same_run(history, reference_two_slices)


def test_dp2_ep2_world4_matches_single_process(weights, reference_four_slices):
    """World 4, EP=2 (dense DP=4, expert DP=2) == world 1 with the same four quarters."""
    history = run_on_ranks(_train_layout, 4, 2, "alltoall", 1, weights)
    _assert_same_run(history, reference_four_slices)


def test_different_weights_are_detected(weights, reference_two_slices, tmp_path):
    """The comparison is sharp: a perturbed expert weight makes it fail."""
    full = torch.load(weights)
    name = next(key for key in full if ".local_experts.3." in key)
    full[name] = full[name] + 1e-2
    perturbed = str(tmp_path / "perturbed.pt")
    torch.save(full, perturbed)
    history = run_on_ranks(_train_layout, 2, 2, "alltoall", 1, perturbed)
    with pytest.raises(AssertionError):
        _assert_same_run(history, reference_two_slices)
