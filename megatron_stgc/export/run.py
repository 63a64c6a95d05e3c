"""``megatron-stgc export --format pretrained | hf | moe-llava --output DIR`` (one process).

The model is built and loaded by training/export.py's ``loaded_model`` (a training checkpoint
in any EP layout with ``--load``, else ``--pretrained-checkpoint``), after the routing options
the target cannot express are switched off with a warning (``target.exported_routing``). The
files are written into a staging directory, reloaded and compared (``verify``); the
directory becomes ``--output`` only when the check passes. ``export_info.json`` records the
source, the warnings and the measured differences.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from megatron_stgc.config import ConfigError, RunConfig
from megatron_stgc.export.lm_export import ExportError

FORMATS = ("pretrained", "hf", "moe-llava")


@dataclass
class ExportOptions:
    output: str
    format: str = "pretrained"
    # the hub name MoE-LLaVA's loader fetches the image tower by (config.json mm_image_tower)
    moe_llava_image_tower: Optional[str] = None
    export_tolerance: float = 1e-3  # max abs logit difference the reload check accepts


def add_export_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, help="the directory to write (new or empty)")
    parser.add_argument("--format", default="pretrained", choices=FORMATS,
                        help="pretrained: model.pt for --pretrained-checkpoint; hf: transformers "
                             "(LlavaForConditionalGeneration / Qwen2-MoE ...); moe-llava: "
                             "MoE-LLaVA's checkpoint layout (docs/EXPORT.md)")
    parser.add_argument("--moe-llava-image-tower", default=None,
                        help="--format moe-llava: config.json mm_image_tower, the hub name "
                             "MoE-LLaVA loads the tower by (e.g. openai/clip-vit-large-patch14-336)")
    parser.add_argument("--export-tolerance", type=float, default=1e-3,
                        help="max abs logit difference between the reloaded export and the "
                             "model (fp32); above it the export fails and nothing is kept")


def run(config: RunConfig, options: ExportOptions, say: Callable[[str], None] = print) -> str:
    """Export; returns the output directory (or model.pt for --format pretrained)."""
    from megatron_stgc.training.export import loaded_model, run_export

    if options.format == "pretrained":
        return run_export(config, options.output)
    if options.format not in FORMATS:
        raise ConfigError(f"--format {options.format!r} is not one of {', '.join(FORMATS)}")
    if not options.export_tolerance > 0:
        raise ConfigError(f"--export-tolerance must be > 0, got {options.export_tolerance}")
    from megatron_stgc.export.target import exported_routing, hf_target
    from megatron_stgc.export.writer import check_output_free, staged_output

    try:
        check_output_free(options.output)
        warnings = exported_routing(config)
        target = hf_target(config) if options.format == "hf" else None
        if options.format == "moe-llava":
            from megatron_stgc.export.moe_llava_format import check_moe_llava_target

            check_moe_llava_target(config, options)
    except ExportError as error:
        raise ConfigError(str(error)) from None
    for warning in warnings:
        say(f"export: warning: {warning}")
    with loaded_model(config) as loaded:
        from megatron_stgc.training.export import model_state_for_export

        state = model_state_for_export(loaded.model)
        say(f"export: {loaded.source}: {len(state)} tensors -> --format {options.format}")
        with staged_output(options.output) as staging:
            if options.format == "hf":
                checks = write_and_check_hf(staging, state, config, target, loaded, options, say)
            else:
                from megatron_stgc.export.moe_llava_format import write_and_check_moe_llava

                checks = write_and_check_moe_llava(staging, state, config, loaded, options, say)
            _write_info(staging, options, loaded.source, warnings, checks, config)
        say(f"export: wrote {options.output} ({options.format})")
        return options.output


def write_and_check_hf(staging: str, state: dict, config: RunConfig, target, loaded,
                       options: ExportOptions, say: Callable[[str], None]) -> dict:
    """Write the transformers model into ``staging``, reload it, compare; the measurements."""
    from megatron_stgc.export import hf_llava, verify
    from megatron_stgc.export.tokenizer_files import transformers_tokenizer
    from megatron_stgc.export.writer import save_safetensors

    dtype = next(loaded.model.parameters()).dtype
    weights = hf_llava.hf_state(state, config, target)
    rows = state["language_model.embedding.word_embeddings.weight"].shape[0]
    text_cfg = hf_llava.text_config(config, target, rows, loaded.tokenizer, dtype)
    hf_config = (hf_llava.llava_config(config, text_cfg, loaded.image_token_id, dtype)
                 if target.vision else text_cfg)
    hf_config.architectures = [hf_llava.architecture(target)]
    hf_config.save_pretrained(staging)
    files = save_safetensors(weights, staging)
    say(f"export: {hf_llava.architecture(target)} ({target.family}"
        f"{', MoE' if target.moe else ''}): {len(weights)} tensors in {', '.join(files)}")
    _generation_config(loaded.tokenizer, rows).save_pretrained(staging)
    from megatron_stgc.export.chat_template import jinja_template, template_name

    tok = transformers_tokenizer(loaded.tokenizer, loaded.image_token_id)
    # on the tokenizer too: lmms-eval's llava_hf applies the tokenizer's template
    tok.chat_template = jinja_template(template_name(config), tok.eos_token)
    if target.vision:
        from megatron_stgc.export.processor import llava_processor

        llava_processor(config, tok).save_pretrained(staging)
    else:
        tok.save_pretrained(staging)
    tokens, pixels = verify.fixed_input(config, loaded.image_token_id, loaded.tokenizer.vocab_size)
    ours = verify.our_logits(loaded.model, tokens, pixels)
    diff = verify.compare(ours, verify.hf_logits(staging, tokens, pixels),
                          options.export_tolerance, f"transformers {hf_llava.architecture(target)}",
                          say)
    if target.vision:
        verify.check_processor_ids(staging, config, loaded.tokenizer, loaded.image_token_id, say)
    return {"max_abs_logit_difference": diff}


def _generation_config(tokenizer, rows: int):
    """Greedy decoding that stops at EOS and, like our eval, never picks an id past the
    tokenizer's (vocabulary padding rows and the image token)."""
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=False, eos_token_id=tokenizer.eos_id,
                            pad_token_id=tokenizer.pad_id,
                            suppress_tokens=list(range(tokenizer.vocab_size, rows)) or None)


def _write_info(staging: str, options: ExportOptions, source: str, warnings: list[str],
                checks: dict, config: RunConfig) -> None:
    import megatron_stgc

    from megatron_stgc.export.chat_template import stop_strings, template_name

    info = {"format": options.format, "source": source, "warnings": warnings,
            "checks": checks, "tolerance": options.export_tolerance,
            "chat_template": template_name(config),
            "stop_strings": list(stop_strings(template_name(config))),
            "torch": torch.__version__, "package": getattr(megatron_stgc, "__version__", None)}
    with open(os.path.join(staging, "export_info.json"), "w") as f:
        json.dump(info, f, indent=2)
