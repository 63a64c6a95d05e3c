"""Which exported format represents a model exactly, and what an export cannot express.

``lm_family(config)`` names the transformers family whose layer computes what ours does:

| family   | our flags                                                               | class |
| -------- | ----------------------------------------------------------------------- | ----- |
| qwen2    | RMSNorm, --swiglu, no --add-bias-linear (q/k/v bias optional), full RoPE | Qwen2ForCausalLM; with MoE layers Qwen2MoeForCausalLM |
| stablelm | LayerNorm, --swiglu, no --add-bias-linear, RoPE (partial allowed)       | StableLmForCausalLM |
| phi      | --parallel-attention-mlp, --openai-gelu, --add-bias-linear, LayerNorm   | PhiForCausalLM |

``hf_target`` refuses what ``--format hf`` cannot write: a MoE model of a family other than
qwen2 (transformers has no StableLM / Phi MoE class; ``--format moe-llava`` writes MoE-LLaVA's
layout), a biased LM head inside LLaVA (transformers' ``LlavaForConditionalGeneration`` owns an
unbiased ``lm_head``), learned absolute positions, anything else no family matches.

``exported_routing(config)`` switches off, in the configuration the export builds, the routing
options an exported model cannot express and returns one warning per option: LTDR (tail
tokens to top-a experts), the Gumbel-sampled second expert, capacity factors (token dropping).
The exported model (and the model the check compares it with) routes like plain top-k,
dropless. STGC adds a loss only; it does not change the forward, so it is switched off
without a warning.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_stgc.export.lm_export import ExportError


@dataclass(frozen=True)
class HfTarget:
    family: str  # qwen2 | stablelm | phi
    moe: bool  # Qwen2MoeForCausalLM
    vision: bool  # inside LlavaForConditionalGeneration


def _family_problems(config) -> dict[str, list[str]]:
    """For each family, why our flags do not match it (empty list: it matches)."""
    m = config.model
    common = []
    if m.position_embedding_type != "rope":
        common.append(f"--position-embedding-type {m.position_embedding_type} (transformers' "
                      "families here use RoPE)")
    swiglu_block = [f"--{flag}" for flag, bad in (
        ("parallel-attention-mlp", m.parallel_attention_mlp), ("add-bias-linear",
                                                               m.add_bias_linear),
        ("openai-gelu", m.openai_gelu), ("add-output-layer-bias", m.add_output_layer_bias))
        if bad] + ([] if m.swiglu else ["no --swiglu"])
    qwen2 = common + swiglu_block + (
        [] if m.normalization == "RMSNorm" else [f"--normalization {m.normalization}"]) + (
        [] if m.rotary_percent == 1.0 else [f"--rotary-percent {m.rotary_percent}"])
    stablelm = common + swiglu_block + (
        [] if m.normalization == "LayerNorm" else [f"--normalization {m.normalization}"])
    phi = common + [f"{name}" for name, ok in (
        ("no --parallel-attention-mlp", m.parallel_attention_mlp),
        ("no --openai-gelu", m.openai_gelu), ("no --add-bias-linear", m.add_bias_linear),
        ("no --add-qkv-bias", m.add_qkv_bias or m.add_bias_linear),
        (f"--normalization {m.normalization}", m.normalization == "LayerNorm")) if not ok]
    return {"qwen2": qwen2, "stablelm": stablelm, "phi": phi}


def lm_family(config) -> str:
    """The transformers family our language model equals; ExportError listing why not."""
    problems = _family_problems(config)
    for family, reasons in problems.items():
        if not reasons:
            return family
    detail = "; ".join(f"{family}: {', '.join(reasons)}" for family, reasons in problems.items())
    raise ExportError(f"no transformers language model computes what this one does ({detail})")


def hf_target(config) -> HfTarget:
    """What ``--format hf`` writes for ``config``, or an ExportError saying which format fits."""
    family = lm_family(config)
    moe = config.model.num_experts is not None
    vision = config.vision.vision_model_type is not None
    if moe and family != "qwen2":
        raise ExportError(
            f"--format hf: this is a {family} language model with MoE layers; transformers has "
            f"no {family} MoE class (its MoE classes are Qwen2-style: RMSNorm, SwiGLU, full "
            f"RoPE). Use --format moe-llava, MoE-LLaVA's own layout, which its model code and "
            f"eval scripts load (docs/EXPORT.md)")
    if vision and config.model.add_output_layer_bias:
        raise ExportError("--format hf: the LM head has a bias (--add-output-layer-bias), which "
                          "transformers' LlavaForConditionalGeneration cannot hold (its lm_head "
                          "is unbiased); use --format moe-llava")
    return HfTarget(family, moe, vision)


def exported_routing(config) -> list[str]:
    """Switch off what the target cannot express (see the module docstring); the warnings."""
    m, warnings = config.model, []
    moe = m.num_experts is not None
    if config.ltdr.enabled and moe and config.ltdr.tail_routing:
        top_a = config.ltdr.resolved_top_a(m.num_experts)
        warnings.append("--ltdr: LTDR's tail routing (image tokens of high routing-probability "
                        f"variance sent to their top-{top_a} experts) is not part of the "
                        "exported model; it routes every token to its top-k experts")
    config.ltdr.enabled = False  # without tail routing LTDR only changes a training loss
    if getattr(m, "moe_router_gumbel_second_expert", False) and moe:
        warnings.append("--moe-router-gumbel-second-expert: the exported model picks the "
                        "second expert deterministically (the noise-free top-k, as our eval "
                        "does); there is no Gumbel sampling in it")
        m.moe_router_gumbel_second_expert = False
    for flag in ("moe_expert_capacity_factor", "moe_eval_capacity_factor"):
        if getattr(m, flag, None) is not None and moe:
            warnings.append(f"--{flag.replace('_', '-')} {getattr(m, flag)}: the exported "
                            "model has no expert capacity; it drops no token (dropless top-k)")
            setattr(m, flag, None)
    config.stgc.enabled = False  # a training loss; the forward is the same
    return warnings
