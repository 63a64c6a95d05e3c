"""``megatron-stgc score``: score an answers file of a benchmark (no model, no torch).

The answers may come from ``megatron-stgc eval`` or from MoE-LLaVA's / LLaVA's own eval
scripts (same answer layout). Prints the report, writes ``--results-file`` and the
benchmark's submission file.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from megatron_stgc.eval.options import EvalOptions, resolve_files


def finish(benchmark, files, questions: Optional[list[dict]], results_file: Optional[str],
           say=print) -> dict:
    """Score ``files.answers_file``, write the submission and results files, print the report."""
    result = benchmark.evaluate(files, questions)
    if results_file:
        os.makedirs(os.path.dirname(os.path.abspath(results_file)), exist_ok=True)
        with open(results_file, "w") as f:
            json.dump(result, f, indent=2)
    say(benchmark.format(result))
    return result


def run_score(options: EvalOptions) -> dict:
    if options.answers_file is None and options.benchmark_dir is None:
        from megatron_stgc.config import ConfigError

        raise ConfigError("score needs --answers-file (or --benchmark-dir with answers/"
                          "<model-id>.jsonl)")
    benchmark, files = resolve_files(options)
    if not os.path.isfile(files.answers_file):
        from megatron_stgc.config import ConfigError

        raise ConfigError(f"--answers-file: {files.answers_file} does not exist")
    return finish(benchmark, files, None, options.results_file)
