"""Command line: ``megatron-stgc train [flags]`` / ``python -m megatron_stgc train [flags]``.

Launch under torchrun for more than one process, e.g.::

    torchrun --nproc-per-node 2 -m megatron_stgc train --config examples/tiny_moe_cpu.yaml
"""

from __future__ import annotations

import sys
from typing import Optional

from megatron_stgc.config import ConfigError, build_arg_parser, parse_run_config

USAGE = """usage: megatron-stgc <command> [flags]

commands:
  train         train a GPT MoE or MoE-LLaVA model (run under torchrun for >1 process)
  eval          greedy answers to a benchmark (--benchmark NAME) from a checkpoint, scored
  score         score a benchmark's answers file (no model; docs/EVAL.md)
  export        a checkpoint -> a --pretrained-checkpoint directory, or with --format hf /
                moe-llava a transformers / MoE-LLaVA model, reloaded and checked (one process)
  plot          PNG figures (loss, conflicts, Fig. 3a/3b/4 analogues) from runs' JSONL logs
  study         a seed-paired study from a grid file, locally or as SLURM jobs (docs/STUDY.md)
  validate      check a config for --world-size N processes (default $WORLD_SIZE or 1) and
                list every problem; needs no GPU and no process group (e.g. on a login node)
  print-config  print the resolved configuration as YAML, then validate it as `validate`

run `megatron-stgc train --help` for the flags; `megatron-stgc --version` for the version."""


def _train(argv: list[str]) -> int:
    from megatron_stgc.training.train import run_training

    import os

    from megatron_stgc.config import toy_defaults_notice

    config = parse_run_config(argv)
    notice = toy_defaults_notice(argv)
    if notice is not None and os.environ.get("RANK", "0") == "0":
        print(f"megatron-stgc train: {notice}", file=sys.stderr, flush=True)
    run_training(config)
    return 0


def _eval(argv: list[str]) -> int:
    import argparse

    from megatron_stgc.eval.options import EvalOptions, add_eval_flags
    from megatron_stgc.eval.run import run_eval

    parser = argparse.ArgumentParser(prog="megatron-stgc eval", add_help=False)
    add_eval_flags(parser)
    eval_args, rest = parser.parse_known_args(argv)
    run_eval(parse_run_config(rest), EvalOptions(**vars(eval_args)))
    return 0


def _score(argv: list[str]) -> int:
    import argparse

    from megatron_stgc.eval.options import EvalOptions, add_score_flags
    from megatron_stgc.eval.score import run_score

    parser = argparse.ArgumentParser(prog="megatron-stgc score",
                                     description="score a benchmark's answers file")
    add_score_flags(parser)
    run_score(EvalOptions(**vars(parser.parse_args(argv))))
    return 0


def _export(argv: list[str]) -> int:
    import argparse

    from megatron_stgc.export.run import ExportOptions, add_export_flags, run

    parser = argparse.ArgumentParser(prog="megatron-stgc export", add_help=False)
    add_export_flags(parser)
    export_args, rest = parser.parse_known_args(argv)
    run(parse_run_config(rest), ExportOptions(**vars(export_args)))
    return 0


def _world_size_and_config(prog: str, argv: list[str]):
    import argparse
    import os

    parser = argparse.ArgumentParser(prog=prog, add_help=False, allow_abbrev=False)
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    args, rest = parser.parse_known_args(argv)
    if args.world_size < 1:
        raise ConfigError(f"--world-size must be >= 1, got {args.world_size}")
    return args.world_size, parse_run_config(rest)


def _report_problems(problems: list[str], world_size: int) -> int:
    """Every problem on stderr, one a line; 2 when there is any."""
    if not problems:
        return 0
    print(f"megatron-stgc: {len(problems)} configuration problem(s) for world size "
          f"{world_size}:", file=sys.stderr)
    for problem in problems:
        print("  " + problem.replace("\n", "\n    "), file=sys.stderr)
    return 2


def _validate(argv: list[str]) -> int:
    from megatron_stgc.validation import config_problems

    world_size, config = _world_size_and_config("megatron-stgc validate", argv)
    problems = config_problems(config, world_size)
    if not problems:
        p = config.parallel
        print(f"valid for world size {world_size}: tensor-parallel "
              f"{p.tensor_model_parallel_size}, expert-parallel {p.expert_model_parallel_size}, "
              f"data-parallel {world_size // p.tensor_model_parallel_size}")
    return _report_problems(problems, world_size)


def _print_config(argv: list[str]) -> int:
    import yaml

    from megatron_stgc.config import fill_defaults
    from megatron_stgc.validation import config_problems

    world_size, config = _world_size_and_config("megatron-stgc print-config", argv)
    print(yaml.safe_dump(fill_defaults(config).to_dict(), sort_keys=False), end="")
    return _report_problems(config_problems(config, world_size), world_size)


def _plot(argv: list[str]) -> int:
    from megatron_stgc.analysis.plots import main as plot_main

    return plot_main(argv)


def _study(argv: list[str]) -> int:
    from megatron_stgc.study.cli import main as study_main

    return study_main(argv)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("megatron-stgc")
    except PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
        return "unknown (not installed)"


COMMANDS = {"train": _train, "eval": _eval, "score": _score, "export": _export,
            "validate": _validate, "print-config": _print_config, "plot": _plot, "study": _study}


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("--version", "-V"):
        print(f"megatron-stgc {_version()}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"megatron-stgc: unknown command {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    if command in ("train", "eval", "export") and rest and rest[0] in ("-h", "--help"):
        if command == "export":
            import argparse

            from megatron_stgc.export.run import add_export_flags

            parser = argparse.ArgumentParser(prog="megatron-stgc export",
                                             description="export flags; the model/data flags "
                                             "are those of train (use the training --config)")
            add_export_flags(parser)
            parser.print_help()
        elif command == "eval":
            import argparse

            from megatron_stgc.eval.options import add_eval_flags

            parser = argparse.ArgumentParser(prog="megatron-stgc eval",
                                             description="eval flags; the model/data flags are "
                                             "those of train (use the training --config)")
            add_eval_flags(parser)
            parser.print_help()
        else:
            build_arg_parser().print_help()
        return 0
    from megatron_stgc.eval.benchmarks.base import BenchmarkError
    from megatron_stgc.data.data_errors import DataError

    try:
        return COMMANDS[command](rest)
    except ConfigError as error:
        print(f"megatron-stgc: configuration error: {error}", file=sys.stderr)
        return 2
    except BenchmarkError as error:
        print(f"megatron-stgc: benchmark file error: {error}", file=sys.stderr)
        return 2
    except DataError as error:
        print(f"megatron-stgc: data error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
