"""Config checks for MoE-LLaVA's recipe flags (called by validation.validate_run_config):
capacity, the Gumbel second expert, --trainable-modules, --chat-template,
--image-aspect-ratio. Each error names the flag."""

from __future__ import annotations

from megatron_stgc.config import ConfigError, RunConfig
from megatron_stgc.problems import check, require as _require

CHAT_TEMPLATES = ("plain", "moe-llava-stablelm", "moe-llava-phi", "moe-llava-qwen",
                  "moe-llava-plain")
ASPECT_RATIOS = ("resize", "pad")
# which freeze flag leaves a --trainable-modules group with nothing to train
_LM_FREEZES = ("freeze_lm_except_moe", "freeze_language_model")
_GROUP_FROZEN_BY = {"vision": ("freeze_vit",), "projector": ("freeze_projection",),
                    "embeddings": _LM_FREEZES, "attention": _LM_FREEZES, "norms": _LM_FREEZES,
                    "dense-ffn": _LM_FREEZES, "experts": ("freeze_language_model",),
                    "routers": ("freeze_language_model",)}


def validate_recipe(config: RunConfig) -> None:
    for group in (_validate_capacity, _validate_gumbel, _validate_trainable,
                  _validate_data_recipe):
        check(group, config)  # inside collect_problems: every group reports


def _validate_capacity(config: RunConfig) -> None:
    m = config.model
    _require(m.moe_token_drop_policy in ("probs", "position"),
             f"--moe-token-drop-policy must be 'probs' or 'position', got "
             f"{m.moe_token_drop_policy!r}")
    eval_factor = m.moe_eval_capacity_factor
    if eval_factor is not None:
        _require(m.num_experts is not None, "--moe-eval-capacity-factor needs --num-experts")
        _require(eval_factor > 0, f"--moe-eval-capacity-factor must be > 0, got {eval_factor}")
        _require(m.moe_token_dispatcher_type == "alltoall",
                 "--moe-eval-capacity-factor needs --moe-token-dispatcher-type alltoall")
    if m.moe_pad_expert_input_to_capacity:
        _require(m.moe_expert_capacity_factor is not None,
                 "--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor")
        _require(eval_factor is None or eval_factor == m.moe_expert_capacity_factor,
                 "--moe-pad-expert-input-to-capacity fixes each dispatcher's capacity when the "
                 "model is built; it cannot switch to a different --moe-eval-capacity-factor")
        _require(not (config.stgc.enabled or config.ltdr.enabled),
                 "--moe-pad-expert-input-to-capacity with --stgc or --ltdr is not supported "
                 "(padded slots are not routed pairs; untested)")


def _validate_gumbel(config: RunConfig) -> None:
    m = config.model
    if not m.moe_router_gumbel_second_expert:
        return
    flag = "--moe-router-gumbel-second-expert"
    _require(m.num_experts is not None, f"{flag} needs --num-experts")
    _require(m.moe_router_topk >= 2,
             f"{flag} needs --moe-router-topk >= 2 (there is no second expert with top-1; "
             "DeepSpeed's top1gating samples nothing either): add "
             "--no-moe-router-gumbel-second-expert")
    _require(not (config.stgc.enabled and config.stgc.mode == "two-pass"),
             f"{flag} with --stgc-mode two-pass: the two passes would sample different "
             "routings; use --stgc-mode single-pass")


def _validate_trainable(config: RunConfig) -> None:
    from megatron_stgc.model.trainable import TrainableSelectionError, parse_trainable_modules

    v = config.vision
    if v.trainable_modules is None:
        return
    try:
        entries = parse_trainable_modules(v.trainable_modules)
    except TrainableSelectionError as error:
        raise ConfigError(str(error)) from None
    for entry in entries:
        if entry.kind != "group" or entry.from_preset is not None:
            continue
        if entry.text in ("vision", "projector"):
            _require(v.vision_model_type is not None,
                     f"--trainable-modules {entry.text} needs --vision-model-type")
        for frozen_by in _GROUP_FROZEN_BY.get(entry.text, ()):
            if getattr(v, frozen_by):
                raise ConfigError(f"--trainable-modules {entry.text} contradicts "
                                  f"--{frozen_by.replace('_', '-')}, which freezes all of it")


def _validate_data_recipe(config: RunConfig) -> None:
    d, v = config.data, config.vision
    _require(d.chat_template in CHAT_TEMPLATES,
             f"--chat-template must be one of {', '.join(CHAT_TEMPLATES)}, got "
             f"{d.chat_template!r}")
    _require(d.chat_template == "plain" or v.vision_model_type is not None,
             f"--chat-template {d.chat_template} applies to LLaVA-format data: it needs "
             "--vision-model-type (text-only runs use the plain template)")
    _require(d.chat_template in ("plain", "moe-llava-plain") or d.tokenizer_model is not None,
             f"--chat-template {d.chat_template} writes MoE-LLaVA's separators "
             "(<|endoftext|>) as text: it needs the language model's own tokenizer "
             "(--tokenizer-model, a Hugging Face tokenizer directory)")
    _require(d.image_aspect_ratio in ASPECT_RATIOS,
             f"--image-aspect-ratio must be 'resize' or 'pad', got {d.image_aspect_ratio!r}")
    _require(d.image_aspect_ratio == "resize" or v.vision_model_type is not None,
             "--image-aspect-ratio pad needs --vision-model-type")
