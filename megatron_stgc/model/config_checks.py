"""The config checks that need the model code or megatron-core: which spec a configuration
gets (Transformer Engine or local, grouped GEMM, sequence parallelism), how many image tokens
the vision tower makes, whether this megatron-core has a feature (the routing tracer), and
megatron-core's own TransformerConfig checks. Run by
megatron_stgc/validation.py after config.check_flags; each error names the flag."""

from __future__ import annotations

import copy
import warnings

from megatron_stgc.config import ConfigError, RunConfig, flag
from megatron_stgc.mcore_compat import ROUTER_TRACE_SINCE, VERSION, router_tracer_class
from megatron_stgc.model.gpt import (grouped_gemm_rule, sequence_parallel_rule,
                                     transformer_config_from, use_transformer_engine)
from megatron_stgc.model.vision import num_image_tokens
from megatron_stgc.problems import check, require as _require

# Text positions a vision-language sample needs besides its image tokens: the chat
# template's user and assistant tags, a short question, an answer token and EOS.
MIN_TEXT_TOKENS = 16


def check_model_flags(config: RunConfig) -> None:
    """The flag checks that depend on the spec and the vision tower (config filled)."""
    tp = config.parallel.tensor_model_parallel_size
    if tp > 1 and config.model.num_experts is not None:
        _require(use_transformer_engine(config),
                 f"--tensor-model-parallel-size ({tp}) > 1 with MoE needs sequence parallelism, "
                 "which needs Transformer Engine norms (GPU); use --tensor-model-parallel-size 1 "
                 "on CPU")
    check(_check_spec_rules, config)
    check(_check_routing_tracer, config)
    if config.vision.vision_model_type in ("clip", "siglip"):
        check(_check_vision_lengths, config)


def _check_spec_rules(config: RunConfig) -> None:
    """--moe-grouped-gemm and --sequence-parallel, when given, must be what the spec does."""
    given_gemm = config.model.moe_grouped_gemm
    given_sp = config.parallel.sequence_parallel
    if given_gemm is None and given_sp is None:
        return
    for key, given, (rule, why) in (
            ("moe_grouped_gemm", given_gemm, grouped_gemm_rule(config)),
            ("sequence_parallel", given_sp, sequence_parallel_rule(config))):
        _require(given is None or given == rule,
                 f"{flag(key)} {str(given).lower()}: this configuration has it "
                 f"{'on' if rule else 'off'} ({why})")


def _check_routing_tracer(config: RunConfig) -> None:
    """--moe-routing-trace-path needs a megatron-core with the tracer (0.19.0 on)."""
    path = config.logging.moe_routing_trace_path
    if path is None or config.model.num_experts is None:
        return
    _require(router_tracer_class() is not None,
             f"--moe-routing-trace-path {path}: megatron-core {VERSION} "
             "has no routing tracer (megatron/core/transformer/moe/router_trace.py); it needs "
             f"megatron-core >= {ROUTER_TRACE_SINCE} (pip install 'megatron-core>=0.19')")


def _check_vision_lengths(config: RunConfig) -> None:
    """--seq-length must hold the image tokens and some text (else every image record would
    be dropped as image_truncated and the run would train on text alone)."""
    image_tokens = num_image_tokens(config)
    needed = image_tokens + MIN_TEXT_TOKENS
    _require(config.model.seq_length >= needed,
             f"--seq-length ({config.model.seq_length}) cannot hold an image sample: "
             f"{image_tokens} image tokens (--img-h {config.vision.img_h} x --img-w "
             f"{config.vision.img_w} / --patch-dim {config.vision.patch_dim}) + at least "
             f"{MIN_TEXT_TOKENS} text tokens = {needed}; raise --seq-length")


def check_with_megatron_core(config: RunConfig) -> None:
    """Build megatron-core's TransformerConfig from ``config`` (no process group needed),
    so that whatever megatron-core itself rejects fails here, before any process starts."""
    variants = [copy.deepcopy(config)]
    eval_factor = config.model.moe_eval_capacity_factor
    if config.model.num_experts is not None and eval_factor is not None:
        variants.append(copy.deepcopy(config))  # what eval mode switches to
        variants[-1].model.moe_expert_capacity_factor = eval_factor
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for variant in variants:
                transformer_config_from(variant)
    except (ValueError, AssertionError, TypeError) as error:
        raise ConfigError(f"megatron-core rejects this configuration: {error}") from None
