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
  train         train a GPT MoE model (run under torchrun for >1 process)
  print-config  print the resolved configuration as YAML and exit

run `megatron-stgc train --help` for the flags."""


def _train(argv: list[str]) -> int:
    from megatron_stgc.training.train import run_training

    config = parse_run_config(argv)
    run_training(config)
    return 0


def _print_config(argv: list[str]) -> int:
    import yaml

    from megatron_stgc.config import fill_defaults

    config = fill_defaults(parse_run_config(argv))
    print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    return 0


COMMANDS = {"train": _train, "print-config": _print_config}


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"megatron-stgc: unknown command {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    if command == "train" and rest and rest[0] in ("-h", "--help"):
        build_arg_parser().print_help()
        return 0
    try:
        return COMMANDS[command](rest)
    except ConfigError as error:
        print(f"megatron-stgc: configuration error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
