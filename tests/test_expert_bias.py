"""Biased experts (add_bias_linear=True) train once the fc2 output is cloned."""

from __future__ import annotations

from dist_utils import build_tiny, rank_micro_batches, run_on_ranks, synthetic_global_batch, tiny_config

from megatron_stgc.model.expert_bias import HOOK_ATTR, expert_fc2_modules, install_expert_bias_fix


def _step(objects, config):
    from megatron_stgc.training.step import train_step

    batches = rank_micro_batches(synthetic_global_batch(4, 16, seed=0), 4)
    result = train_step(objects.model, objects.optimizer, objects.scheduler, iter(batches),
                        len(batches), 4, 16)
    return float(result.losses[0]["lm_loss"][0])


def _biased_experts(rank, world_size):
    import torch

    config = tiny_config(add_bias_linear=True, global_batch_size=4, micro_batch_size=4)
    objects = build_tiny(config)
    model = objects.unwrapped_model
    fc2s = expert_fc2_modules(model)
    hooked = [hasattr(fc2, HOOK_ATTR) for fc2 in fc2s]
    reinstalled = install_expert_bias_fix(model)  # idempotent

    tokens = synthetic_global_batch(4, 16, seed=1)
    with torch.no_grad():
        with_hook = model(tokens["tokens"], tokens["position_ids"], None, labels=tokens["labels"])
        for fc2 in fc2s:
            getattr(fc2, HOOK_ATTR).remove()
            delattr(fc2, HOOK_ATTR)
        without_hook = model(tokens["tokens"], tokens["position_ids"], None,
                             labels=tokens["labels"])
    try:
        _step(objects, config)
        error_without = None
    except RuntimeError as error:
        error_without = str(error)
    install_expert_bias_fix(model)
    loss_with = _step(objects, config)
    return {"num_fc2": len(fc2s), "hooked": hooked, "reinstalled": reinstalled,
            "same_forward": bool(torch.equal(with_hook, without_hook)),
            "error_without": error_without, "loss_with": loss_with}


def _unbiased_experts(rank, world_size):
    objects = build_tiny(tiny_config(add_bias_linear=False))
    return install_expert_bias_fix(objects.unwrapped_model)


def test_biased_experts_train_with_the_hook_and_not_without():
    outcome = run_on_ranks(_biased_experts, 1)[0]
    assert outcome["num_fc2"] == 2 * 4  # 2 MoE layers x 4 experts
    assert all(outcome["hooked"]) and outcome["reinstalled"] == 0
    assert outcome["same_forward"], "the hook must not change the forward values"
    assert outcome["error_without"] is not None and "is a view" in outcome["error_without"]
    assert outcome["loss_with"] > 0


def test_unbiased_experts_are_not_hooked():
    assert run_on_ranks(_unbiased_experts, 1)[0] == 0
