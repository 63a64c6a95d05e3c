"""The flags of ``megatron-stgc eval`` / ``score`` and the benchmark files they resolve to.

The model and data flags are the training flags (``--config`` ...); these are eval's own.
A benchmark's files default to MoE-LLaVA's ``eval/<benchmark>`` layout under
``--benchmark-dir``; ``--question-file``, ``--image-folder``, ``--annotations``,
``--answers-file`` and ``--submission-file`` override single paths.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Optional

from megatron_stgc.config import ConfigError


@dataclass
class EvalOptions:
    question_file: Optional[str] = None
    answers_file: Optional[str] = None
    ground_truth: Optional[str] = None  # the generic benchmark's name for --annotations
    max_new_tokens: Optional[int] = None  # None: the benchmark's (128; 1024 for sqa-img, mmbench)
    eval_batch_size: int = 16
    model_id: str = "megatron-stgc"
    results_file: Optional[str] = None  # scores as JSON
    # pad each decoding step's sequence length to a multiple of this (None: 16 with
    # --fp8-format, whose Transformer Engine GEMMs need it, else 1); no KV cache then
    eval_pad_to_multiple: Optional[int] = None
    benchmark: str = "llava"
    benchmark_dir: Optional[str] = None  # MoE-LLaVA's eval/<benchmark> folder
    image_folder: Optional[str] = None  # default: the benchmark's (generic: --image-root)
    annotations: Optional[str] = None  # ground truth file/folder; default: the benchmark's
    submission_file: Optional[str] = None
    prompt_suffix: Optional[str] = None  # default: the benchmark's
    kv_cache: Optional[bool] = None  # None: on, except where it cannot run (FP8, padding)


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def add_score_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that locate a benchmark's files (eval and score)."""
    from megatron_stgc.eval.benchmarks import BENCHMARK_NAMES

    parser.add_argument("--benchmark", default="llava",
                        help=f"one of {', '.join(BENCHMARK_NAMES)} (llava: a generic LLaVA "
                             "question file scored by exact match)")
    parser.add_argument("--benchmark-dir", default=None,
                        help="the benchmark's folder in MoE-LLaVA's eval/ layout (docs/EVAL.md)")
    parser.add_argument("--question-file", default=None,
                        help="question file (default: the benchmark's, under --benchmark-dir)")
    parser.add_argument("--image-folder", default=None,
                        help="where the questions' images are (default: the benchmark's; "
                             "llava: --image-root)")
    parser.add_argument("--annotations", default=None,
                        help="ground truth file or folder (default: the benchmark's, if present)")
    parser.add_argument("--ground-truth", default=None,
                        help="llava benchmark: JSONL of question_id, answer, category")
    parser.add_argument("--answers-file", default=None,
                        help="answers JSONL (default: <benchmark-dir>/answers/<model-id>.jsonl)")
    parser.add_argument("--submission-file", default=None,
                        help="benchmark server file (default: <benchmark-dir>/answers_upload/...)")
    parser.add_argument("--prompt-suffix", default=None,
                        help="appended to every question (default: the benchmark's)")
    parser.add_argument("--model-id", default="megatron-stgc")
    parser.add_argument("--results-file", default=None, help="write the scores as JSON")


def add_eval_flags(parser: argparse.ArgumentParser) -> None:
    add_score_flags(parser)
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="answer length (default: the benchmark's; 128, as MoE-LLaVA)")
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--eval-pad-to-multiple", type=int, default=None,
                        help="pad every decoding step's sequence length to a multiple of N "
                             "(default: 16 with --fp8-format, else 1); answers do not change")
    parser.add_argument("--kv-cache", dest="kv_cache", nargs="?", const=True, type=_bool,
                        default=None, help="generate with a KV cache (default: on, except "
                                           "with --fp8-format or sequence parallelism)")
    parser.add_argument("--no-kv-cache", dest="kv_cache", action="store_const", const=False)


def resolve_files(options: EvalOptions, image_root: Optional[str] = None):
    """(Benchmark, BenchmarkFiles) for ``options``; ConfigError naming the flag otherwise.
    ``image_root``: the training --image-root (the generic benchmark's image default)."""
    from megatron_stgc.eval.benchmarks import get_benchmark

    try:
        benchmark = get_benchmark(options.benchmark)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if options.benchmark_dir is not None and not os.path.isdir(options.benchmark_dir):
        raise ConfigError(f"--benchmark-dir: {options.benchmark_dir} is not a directory")
    if options.ground_truth is not None and options.benchmark != "llava":
        raise ConfigError(f"--ground-truth is the llava benchmark's; --benchmark "
                          f"{options.benchmark} takes --annotations")
    files = benchmark.files(
        options.benchmark_dir, question_file=options.question_file,
        image_folder=options.image_folder or (image_root if options.benchmark == "llava"
                                              else None),
        annotations=options.annotations or options.ground_truth,
        answers_file=options.answers_file, submission_file=options.submission_file,
        prompt_suffix=options.prompt_suffix, model_id=options.model_id)
    _check_files(options, files)
    return benchmark, files


def _check_files(options: EvalOptions, files) -> None:
    where = (f" (from --benchmark-dir {options.benchmark_dir})"
             if options.benchmark_dir is not None else "")
    if files.question_file is None:
        raise ConfigError(f"--benchmark {options.benchmark} needs --benchmark-dir (its folder in "
                          "MoE-LLaVA's eval/ layout) or --question-file")
    if not os.path.isfile(files.question_file):
        raise ConfigError(f"--question-file: {files.question_file} does not exist{where}")
    if files.answers_file is None:
        raise ConfigError("--answers-file is needed (or --benchmark-dir, whose answers/ folder "
                          "then holds it)")
    given = options.annotations or options.ground_truth
    if given is not None and not os.path.exists(given):
        flag = "--annotations" if options.annotations else "--ground-truth"
        raise ConfigError(f"{flag}: {given} does not exist")
    if options.image_folder is not None and options.benchmark != "mmbench" \
            and not os.path.isdir(options.image_folder):
        raise ConfigError(f"--image-folder: {options.image_folder} is not a directory")


def validate_eval_options(options: EvalOptions) -> None:
    for name in ("max_new_tokens", "eval_batch_size"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
