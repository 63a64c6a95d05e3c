"""Megatron-LM's common flags: accepted with Megatron-LM's meaning (--lr-warmup-iters,
--lr-decay-iters, --train-samples, --moe-z-loss-coeff, --disable-bias-linear, --freeze-LM;
--eval-interval / --eval-iters / --valid-data-path: tests/test_validation.py),
checked against this package's rule (--moe-grouped-gemm, --sequence-parallel,
--moe-router-load-balancing-type), or refused with what to use instead."""

from __future__ import annotations

import math

import pytest
import torch

from dist_utils import tiny_config
from megatron_stgc.config import ConfigError, fill_defaults, parse_run_config
from megatron_stgc.validation import config_problems
from megatron_stgc.model.gpt import Hardware, transformer_config_kwargs
from megatron_stgc.training.setup import build_scheduler

CPU = Hardware(cuda=False, transformer_engine=False)


def test_disable_bias_linear_overrides_the_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("add_bias_linear: true\n")
    assert parse_run_config(["--config", str(path)]).model.add_bias_linear
    assert not parse_run_config(["--config", str(path), "--disable-bias-linear"]).model.add_bias_linear
    path.write_text("disable_bias_linear: true\nsplit: 90,5,5\n")  # the YAML spellings
    with pytest.raises(ConfigError, match="^--split \\(Megatron-LM\\)"):
        parse_run_config(["--config", str(path)])
    path.write_text("add_bias_linear: true\ndisable_bias_linear: true\n")
    assert not parse_run_config(["--config", str(path)]).model.add_bias_linear


def test_unimplemented_flags_are_refused_with_what_to_use():
    with pytest.raises(ConfigError) as raised:
        parse_run_config(["--split", "90,5,5"])
    problems = raised.value.problems
    assert len(problems) == 1
    assert problems[0].startswith("--split (Megatron-LM): ") and "--valid-data-path" in problems[0]


def test_load_options_need_load(tmp_path):
    problems = config_problems(tiny_config(finetune=True, no_load_optim=True, no_load_rng=True), 1)
    for key in ("--finetune", "--no-load-optim", "--no-load-rng"):
        assert f"{key} needs --load" in problems
    same = tiny_config(finetune=True, load=str(tmp_path), save=str(tmp_path))
    assert any(p.startswith("--finetune with --load equal to --save") for p in
               config_problems(same, 1))
    assert not config_problems(tiny_config(finetune=True, load=str(tmp_path)), 1)


def _lrs(config, steps: int) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=config.training.lr)  # the scheduler sets param_groups' lr
    scheduler = build_scheduler(optimizer, config)
    lrs = []
    for _ in range(steps):
        scheduler.step(1)
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def test_lr_warmup_and_decay_iters():
    config = tiny_config(train_iters=40, lr=1.0, min_lr=0.1, lr_decay_style="linear",
                         lr_warmup_iters=4, lr_decay_iters=20)
    lrs = _lrs(config, 30)
    for step, lr in enumerate(lrs, start=1):  # Megatron-LM's linear schedule, written out
        if step <= 4:
            expected = step / 4
        elif step <= 20:
            expected = 0.1 + 0.9 * (1 - (step - 4) / 16)
        else:
            expected = 0.1
        assert math.isclose(lr, expected, rel_tol=1e-6), (step, lr, expected)
    assert not config_problems(config, world_size=1)
    bad = tiny_config(train_iters=40, lr_warmup_iters=20, lr_decay_iters=20)
    assert any("--lr-warmup-iters (20) must lie in [0, --lr-decay-iters or --train-iters (20))"
               in p for p in config_problems(bad, world_size=1))


def test_train_samples_sets_train_iters():
    config = fill_defaults(tiny_config(train_samples=42, global_batch_size=4))
    assert config.training.train_iters == 10  # 42 // 4, as Megatron-LM
    few = tiny_config(train_samples=3, global_batch_size=4)
    assert any("--train-samples (3) must be >= --global-batch-size (4)" in p
               for p in config_problems(few, world_size=1))


def test_z_loss_reaches_megatron_core_and_is_refused_with_ltdr():
    kwargs = transformer_config_kwargs(tiny_config(moe_z_loss_coeff=1e-3), CPU)
    assert kwargs["moe_z_loss_coeff"] == 1e-3
    assert transformer_config_kwargs(tiny_config(), CPU)["moe_z_loss_coeff"] is None
    problems = config_problems(tiny_config(moe_z_loss_coeff=1e-3, ltdr=True), world_size=1)
    assert any("--moe-z-loss-coeff with --ltdr" in p for p in problems)


def test_rules_checked_flags():
    assert not config_problems(tiny_config(moe_grouped_gemm=False, sequence_parallel=False), 1)
    problems = config_problems(tiny_config(moe_grouped_gemm=True, sequence_parallel=True,
                                           moe_router_load_balancing_type="sinkhorn"), 1)
    assert any(p.startswith("--moe-grouped-gemm true: this configuration has it off "
                            "(TEGroupedMLP needs Transformer Engine)") for p in problems), problems
    assert any(p.startswith("--sequence-parallel true: this configuration has it off (it needs "
                            "--tensor-model-parallel-size > 1)") for p in problems), problems
    assert any("--moe-router-load-balancing-type 'sinkhorn': only 'aux_loss'" in p
               for p in problems)
