"""Validating a RunConfig before any process group exists: every problem at once.

Three layers, in this order, each naming the flag: the flag checks (config.check_flags),
MoE-LLaVA's recipe flags (recipe_checks), and the checks that need the model code
(model/config_checks). megatron-core's own TransformerConfig checks run last, and only when
nothing else was found (their errors would repeat ours). config.py imports neither the
model nor megatron-core; this module imports both.
"""

from __future__ import annotations

from megatron_stgc.config import RunConfig, check_flags, fill_defaults
from megatron_stgc.model.config_checks import check_model_flags, check_with_megatron_core
from megatron_stgc.problems import check, collect_problems, raise_problems
from megatron_stgc.recipe_checks import validate_recipe


def validate_run_config(config: RunConfig, world_size: int, training: bool = True) -> None:
    """Check a RunConfig for a run on ``world_size`` processes; raise one ConfigError that
    lists every problem found (``.problems``), each naming its flag.

    Needs no process group: call before torch.distributed is initialised (``megatron-stgc
    validate --world-size N`` checks a many-rank config in one process). ``training=False``
    (eval): the batch-size flags need not fit this world size, and a vision-language model
    needs no --data-path.
    """
    raise_problems(config_problems(config, world_size, training))


def config_problems(config: RunConfig, world_size: int, training: bool = True) -> list[str]:
    """Every problem of ``config`` for ``world_size`` processes (empty: valid)."""
    problems = collect_problems([lambda: _check_all_flags(config, world_size, training)])
    if not problems:
        problems = collect_problems([lambda: check_with_megatron_core(config)])
    return problems


def _check_all_flags(config: RunConfig, world_size: int, training: bool) -> None:
    fill_defaults(config)
    check(check_flags, config, world_size, training)
    check(validate_recipe, config)
    check(check_model_flags, config)
