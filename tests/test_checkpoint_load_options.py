"""Megatron-LM's --no-load-optim, --no-load-rng and --finetune on a real checkpoint (EP=2,
2 gloo ranks): compared with a fresh model whose weights are copied from the saved tensors
by hand (the slow, obvious reference) and with the uninterrupted run."""

from __future__ import annotations

import torch

from dist_utils import build_tiny, run_on_ranks, tiny_config
from test_checkpoint import _losses

SAVED_AT = 2


def _params(objects) -> list[torch.Tensor]:
    return list(objects.model[0].module.parameters())


def _after_load(config, root, saved, how):
    """Iteration, weights check, RNG check and the next two steps' losses after loading."""
    from megatron.core import parallel_state

    from megatron_stgc.training.checkpoint import TrainProgress, load_checkpoint
    from megatron_stgc.training.logging import StepLogger
    from megatron_stgc.training.train import resume_or_start

    objects = build_tiny(config)
    torch.manual_seed(99)
    rng_before = torch.get_rng_state()
    if how == "copy":  # the reference: a fresh optimizer on the saved weights
        with torch.no_grad():
            for param, value in zip(_params(objects), saved):
                param.copy_(value)
        progress = TrainProgress(SAVED_AT, SAVED_AT * 8)
    elif how == "finetune":
        progress = resume_or_start(config, objects, StepLogger(1, config.training.train_iters))
    else:
        progress = load_checkpoint(root, objects.model, objects.optimizer, objects.scheduler,
                                   load_optim=how != "no_optim", load_rng=how != "no_rng")
    result = dict(iteration=progress.iteration,
                  weights=all(torch.equal(p, s) for p, s in zip(_params(objects), saved)),
                  rng_kept=torch.equal(torch.get_rng_state(), rng_before),
                  losses=_losses(objects, range(SAVED_AT, SAVED_AT + 2)))
    parallel_state.destroy_model_parallel()
    return result


def _load_options(rank, world_size, root, other):
    from megatron.core import parallel_state

    from megatron_stgc.training.checkpoint import TrainProgress, save_checkpoint

    config = tiny_config(2, global_batch_size=8, micro_batch_size=2, train_iters=6,
                         lr_warmup_fraction=0.0)
    first = build_tiny(config)
    _losses(first, range(SAVED_AT))
    saved = [p.detach().clone() for p in _params(first)]
    save_checkpoint(root, first.model, first.optimizer, first.scheduler,
                    TrainProgress(SAVED_AT, SAVED_AT * 8))
    straight = _losses(first, range(SAVED_AT, SAVED_AT + 2))
    save_checkpoint(other, first.model, first.optimizer, first.scheduler,
                    TrainProgress(SAVED_AT + 2, (SAVED_AT + 2) * 8))
    parallel_state.destroy_model_parallel()
    results = {how: _after_load(config, root, saved, how)
               for how in ("full", "no_optim", "no_rng", "copy")}
    tuned = tiny_config(2, global_batch_size=8, micro_batch_size=2, train_iters=6,
                        lr_warmup_fraction=0.0, load=root, finetune=True)
    results["finetune"] = _after_load(tuned, root, saved, "finetune")
    tuned.checkpoint.save = other  # a restarted fine-tuning run: its own checkpoints win
    results["finetune_restart"] = _after_load(tuned, root, saved, "finetune")
    return straight, results


def test_no_load_optim_no_load_rng_and_finetune(tmp_path):
    for straight, r in run_on_ranks(_load_options, 2, str(tmp_path / "a"), str(tmp_path / "b")):
        assert r["full"]["losses"] == straight and not r["full"]["rng_kept"]
        # --no-load-optim: saved weights and iteration, a fresh optimizer and scheduler
        assert r["no_optim"]["iteration"] == SAVED_AT and r["no_optim"]["weights"]
        assert r["no_optim"]["losses"] == r["copy"]["losses"]
        assert r["no_optim"]["losses"][1] != straight[1]  # the Adam state mattered
        # --no-load-rng: everything but the RNG states
        assert r["no_rng"]["rng_kept"] and r["no_rng"]["losses"] == straight
        # --finetune: the weights only, iteration 0
        assert r["finetune"]["iteration"] == 0 and r["finetune"]["weights"]
        assert r["finetune"]["losses"] == r["copy"]["losses"]
        assert r["finetune_restart"]["iteration"] == SAVED_AT + 2
