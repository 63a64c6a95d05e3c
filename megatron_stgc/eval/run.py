"""``megatron-stgc eval``: a benchmark's questions -> greedy answers -> answers file, scores,
submission file.

Checks everything it can before any process group exists (flags, the benchmark's files and
their layout), builds only the model (``model_only.py``), shares the questions over the
data-parallel ranks (``distribute.py``), decodes with megatron-core's KV cache
(``generation.py``), and on rank 0 writes LLaVA's answer layout and scores it with the
benchmark's official metric (``benchmarks/``), as ``megatron-stgc score`` would.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch.distributed as dist

from megatron_stgc.config import ConfigError, RunConfig
from megatron_stgc.eval.options import EvalOptions, resolve_files, validate_eval_options


def eval_pad_multiple(config: RunConfig, options: EvalOptions) -> int:
    """What every decoding step's sequence length is padded to a multiple of: 16 under FP8
    (Transformer Engine's GEMMs), times the TP size under sequence parallelism (the sequence
    is split over the TP ranks); --eval-pad-to-multiple overrides."""
    if options.eval_pad_to_multiple is not None:
        if options.eval_pad_to_multiple < 1:
            raise ConfigError(f"--eval-pad-to-multiple must be >= 1, got "
                              f"{options.eval_pad_to_multiple}")
        return options.eval_pad_to_multiple
    from megatron_stgc.model.gpt import transformer_config_kwargs

    multiple = 16 if config.precision.fp8_format else 1
    if transformer_config_kwargs(config)["sequence_parallel"]:
        multiple = math.lcm(multiple, config.parallel.tensor_model_parallel_size)
    return multiple


def use_kv_cache(options: EvalOptions, pad_multiple: int) -> bool:
    """The KV cache decodes one token per row per step, which padded steps (FP8 GEMMs,
    sequence parallelism) cannot: there eval re-runs whole sequences, and an explicit
    --kv-cache is an error."""
    if pad_multiple > 1:
        if options.kv_cache:
            raise ConfigError(f"--kv-cache decodes one token per step; the steps must be padded "
                              f"to a multiple of {pad_multiple} here (--fp8-format, sequence "
                              "parallelism or --eval-pad-to-multiple): use --no-kv-cache")
        return False
    return options.kv_cache is not False


def check_eval_config(config: RunConfig, options: EvalOptions) -> None:
    from megatron_stgc import parallel
    from megatron_stgc.validation import validate_run_config

    if config.checkpoint.load is None:
        raise ConfigError("eval needs --load (the trained checkpoint)")
    if config.model.num_experts is not None and config.parallel.expert_model_parallel_size > 1 \
            and config.model.moe_token_dispatcher_type != "alltoall":
        raise ConfigError("eval needs --moe-token-dispatcher-type alltoall when "
                          "--expert-model-parallel-size > 1 (ranks decode batches of different "
                          "shapes; the dispatcher does not change the weights)")
    validate_eval_options(options)
    validate_run_config(config, parallel.world_size_from_env(), training=False)


def run_eval(config: RunConfig, options: EvalOptions, prompt_builder=None,
             stop_strings: Optional[Sequence[str]] = None) -> Optional[dict]:
    """Answer and score ``options.benchmark`` with the --load checkpoint; rank 0 returns the
    report. ``prompt_builder`` / ``stop_strings``: default the --chat-template's
    (``ChatTemplate.prompt_tokens`` / ``.stop_strings``)."""
    from megatron_stgc import parallel
    from megatron_stgc.data.chat_templates import get_template

    template = get_template(config.data.chat_template)
    prompt_builder = prompt_builder or template.prompt_tokens
    stop_strings = template.stop_strings if stop_strings is None else stop_strings

    check_eval_config(config, options)
    benchmark, files = resolve_files(options, config.data.image_root)
    questions = benchmark.read_questions(files)  # BenchmarkError before any process starts
    benchmark.score(questions, [None] * len(questions), files)  # the ground truth's layout too
    kv_cache = use_kv_cache(options, eval_pad_multiple(config, options))
    parallel.initialize_distributed()
    try:
        decoder, iteration = _decoder(config, options, benchmark, files, questions, kv_cache,
                                      prompt_builder, stop_strings)
        if dist.get_rank() == 0:
            print(f"eval: {benchmark.name}, {len(questions)} questions from "
                  f"{files.question_file}, checkpoint {config.checkpoint.load} iteration "
                  f"{iteration}, {'KV cache' if kv_cache else 'no KV cache'}, "
                  f"{decoder.max_new_tokens} new tokens at most", flush=True)
        from megatron_stgc.eval.distribute import answer_questions

        answers = answer_questions(decoder, questions, options.eval_batch_size)
        if dist.get_rank() != 0:
            return None
        return _write_and_score(benchmark, files, questions, answers, options)
    finally:
        parallel.destroy()


def _decoder(config, options, benchmark, files, questions, kv_cache, prompt_builder,
             stop_strings):
    from megatron_stgc.eval.generate import GreedyDecoder
    from megatron_stgc.eval.model_only import build_eval_model

    built = build_eval_model(config)
    if dist.get_rank() == 0:
        benchmark.prepare_images(questions, files)
        _report_missing_images(questions, files.image_folder)
    dist.barrier()  # MMBench's images are decoded (on rank 0) before any rank reads them
    decoder = GreedyDecoder(
        built.model, built.tokenizer, built.image_loader, files.image_folder,
        built.image_token_id, built.num_image_tokens,
        options.max_new_tokens or benchmark.defaults.max_new_tokens, config.model.seq_length,
        eval_pad_multiple(config, options), config.data.allow_image_outside_root,
        kv_cache=kv_cache, prompt_builder=prompt_builder, stop_strings=stop_strings)
    return decoder, built.iteration


def _report_missing_images(questions: list[dict], image_folder: Optional[str]) -> None:
    from megatron_stgc.eval.benchmarks.base import count_missing_images

    missing = count_missing_images(questions, image_folder)
    if missing:
        print(f"eval: {len(missing)} of {len(questions)} questions name an image that is not "
              f"under {image_folder} (e.g. {missing[:3]}); they are answered with an error "
              "and counted in the scores", flush=True)


def _write_and_score(benchmark, files, questions, answers, options) -> dict:
    from megatron_stgc.eval import scoring
    from megatron_stgc.eval.benchmarks.base import answer_record
    from megatron_stgc.eval.score import finish

    records = [answer_record(q, a["text"], number, options.model_id, a.get("error"))
               for number, (q, a) in enumerate(zip(questions, answers))]
    scoring.write_answers(files.answers_file, records)
    print(f"eval: answers written to {files.answers_file}", flush=True)
    return finish(benchmark, files, questions, options.results_file,
                  say=lambda text: print(text, flush=True))
