"""Guards: NaN/inf gradients never reach the weights; impossible configs fail before any
process group exists.

The NaN is real: a gradient hook on one expert weight of rank 1 (EP=2, so no other
rank holds that expert) turns its gradient into NaN for one step. Rank 0 sees only
finite gradients, yet both ranks must take the same decision (the check is
collective): with --nan-policy skip the step leaves every weight and the LR schedule
untouched and the next step trains normally; with --nan-policy abort every rank
raises NonFiniteError naming the iteration and the flag.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist

from dist_utils import (build_tiny, named_global_tensors, rank_micro_batches, run_on_ranks,
                        synthetic_global_batch, tiny_config)
from megatron_stgc.config import ConfigError, parse_run_config
from megatron_stgc.validation import validate_run_config

GLOBAL_BATCH, MICRO_BATCH, SEQ = 8, 2, 16


def _step(objects, batch, guard, iteration):
    from megatron_stgc.training.step import train_step

    guard.iteration = iteration
    return train_step(objects.model, objects.optimizer, objects.scheduler,
                      iter(rank_micro_batches(batch, MICRO_BATCH)),
                      GLOBAL_BATCH // (MICRO_BATCH * 2), MICRO_BATCH, SEQ)


def _poison_expert_grad(objects, rank):
    """On rank 1 only: the first local expert's fc1 weight gradient becomes NaN."""
    if rank != 1:
        return None
    name, param = next((n, p) for n, p in objects.unwrapped_model.named_parameters()
                       if ".local_experts.0.linear_fc1.weight" in n)
    return param.register_hook(lambda grad: grad * float("nan"))


def _nan_step_on_ranks(rank, world_size, policy):
    from megatron_stgc.training.guards import NonFiniteError, install_nonfinite_guard

    config = tiny_config(expert_parallel=2, global_batch_size=GLOBAL_BATCH,
                         micro_batch_size=MICRO_BATCH, nan_policy=policy)
    objects = build_tiny(config)
    guard = install_nonfinite_guard(objects.model, objects.optimizer, policy)
    batch = synthetic_global_batch(GLOBAL_BATCH, SEQ)
    first = _step(objects, batch, guard, 1)
    assert first.update_successful and math.isfinite(first.grad_norm)

    before = named_global_tensors(objects.model[0])
    scheduler_steps = objects.scheduler.num_steps
    handle = _poison_expert_grad(objects, rank)
    out = {"rank": rank}
    try:
        second = _step(objects, batch, guard, 2)
    except NonFiniteError as error:
        out["error"] = str(error)
        return out
    finally:
        if handle is not None:
            handle.remove()
    after = named_global_tensors(objects.model[0])
    out["skipped"] = not second.update_successful
    out["unchanged"] = all(torch.equal(before[k], after[k]) for k in before)
    out["finite"] = all(bool(torch.isfinite(t).all()) for t in after.values())
    out["scheduler_stepped"] = objects.scheduler.num_steps != scheduler_steps
    out["skipped_steps"] = guard.skipped_steps
    third = _step(objects, batch, guard, 3)
    final = named_global_tensors(objects.model[0])
    out["third_ok"] = third.update_successful and math.isfinite(third.grad_norm)
    out["third_changed"] = any(not torch.equal(after[k], final[k]) for k in after)
    out["third_finite"] = all(bool(torch.isfinite(t).all()) for t in final.values())
    guard.remove()
    return out


def test_skip_policy_skips_the_update_on_every_rank():
    results = run_on_ranks(_nan_step_on_ranks, 2, "skip", timeout=300)
    for out in results:
        assert out["skipped"], out
        assert out["unchanged"] and out["finite"], out
        assert not out["scheduler_stepped"], out
        assert out["skipped_steps"] == 1, out
        assert out["third_ok"] and out["third_changed"] and out["third_finite"], out


def test_abort_policy_stops_every_rank_with_a_clear_message():
    results = run_on_ranks(_nan_step_on_ranks, 2, "abort", timeout=300)
    for out in results:
        assert "error" in out, out
        assert "iteration 2: non-finite gradient (NaN or inf)" in out["error"]
        assert "--nan-policy abort" in out["error"]


def test_non_finite_loss_aborts_under_abort():
    from megatron_stgc.training.guards import NonFiniteError, NonFiniteGuard

    class _Optimizer:
        def step(self):
            return True, 1.0, None

    guard = NonFiniteGuard([], _Optimizer(), "abort")
    guard.iteration = 5
    guard.check_loss(1.5)
    with pytest.raises(NonFiniteError, match="iteration 5: non-finite loss"):
        guard.check_loss(float("inf"))


BAD = [
    (["--nan-policy", "ignore"], "--nan-policy"),
    (["--keep-last", "0", "--save", "/tmp/x"], "--keep-last"),
    (["--keep-last", "2"], "--keep-last needs --save"),
    (["--moe-router-topk", "1", "--moe-router-pre-softmax", "false"], "--moe-router-topk 1"),
    (["--normalization", "BatchNorm"], "--normalization"),
    (["--hidden-dropout", "1.5"], "--hidden-dropout"),
    (["--position-embedding-type", "alibi"], "--position-embedding-type"),
]


@pytest.mark.parametrize("argv,flag", BAD, ids=[b[1] for b in BAD])
def test_bad_guard_flags_fail_before_any_process_group(argv, flag):
    process_group_before = dist.is_initialized()  # other tests may have made one
    with pytest.raises(ConfigError, match=flag):
        validate_run_config(parse_run_config(argv), world_size=1)
    assert dist.is_initialized() == process_group_before  # none created


def test_load_whose_tracker_names_a_missing_checkpoint_fails_early(tmp_path):
    process_group_before = dist.is_initialized()  # other tests may have made one
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("40\n")
    os.makedirs(tmp_path / "iter_0000020")
    config = parse_run_config(["--load", str(tmp_path), "--save", str(tmp_path)])
    with pytest.raises(ConfigError, match="names iteration 40 but .*iter_0000040 is missing"):
        validate_run_config(config, world_size=1)
    assert dist.is_initialized() == process_group_before  # none created


def test_what_megatron_core_rejects_is_caught_before_any_process_group():
    """The last check builds megatron-core's TransformerConfig; its own errors become
    ConfigErrors (here top-1 routing without pre-softmax, which our earlier check would
    name first)."""
    process_group_before = dist.is_initialized()  # other tests may have made one
    from megatron_stgc.model.config_checks import check_with_megatron_core

    config = parse_run_config(["--moe-router-topk", "1", "--moe-router-pre-softmax", "false"])
    with pytest.raises(ConfigError, match="megatron-core rejects this configuration: .*topk"):
        check_with_megatron_core(config)
    check_with_megatron_core(parse_run_config([]))  # the defaults pass
    # MoE-LLaVA's 4-Top-1: pre-softmax is switched on for top-1 by default
    validate_run_config(parse_run_config(["--moe-router-topk", "1"]), world_size=1)
    assert dist.is_initialized() == process_group_before  # none created
