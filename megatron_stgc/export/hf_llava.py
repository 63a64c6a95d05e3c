"""Our model -> transformers' config objects and weights (``--format hf``).

Weights are written in the layout transformers 5.25's own ``save_pretrained`` writes for
these classes (checked: a LlavaForConditionalGeneration with a Qwen2-MoE text model saved by
transformers has exactly these names), which older releases and other loaders read too::

    language_model.model.*          the language model (lm_export.export_dense_lm names)
    language_model.lm_head.weight   untied models only
    vision_tower.vision_model.*     the tower (hf_vision.export_vision)
    multi_modal_projector.linear_{1,2}.{weight,bias}   <- vision_projection.encoder.linear_fc{1,2}

A text-only model is the causal LM alone (``model.*``, ``lm_head.weight``).

Qwen2-MoE (``Qwen2MoeForCausalLM``): layer i is sparse when ``i not in mlp_only_layers`` (and
``decoder_sparse_step`` 1), so ``mlp_only_layers`` = our dense layers places the experts exactly
where megatron put them (--moe-layer-freq or --moe-layer-pattern). Per MoE layer::

    decoder.layers.i.mlp.router.weight [E, h]                 -> mlp.gate.weight
    ...mlp.experts.local_experts.e.linear_fc1 [2f, h]         -> mlp.experts.e.{gate,up}_proj
    ...mlp.experts.local_experts.e.linear_fc2 [h, f]          -> mlp.experts.e.down_proj
    (none)                                                    -> mlp.shared_expert.* [0, h] /
                                                                 [h, 0], shared_expert_gate 0

transformers' Qwen2-MoE block always adds ``sigmoid(shared_expert_gate(x)) *
shared_expert(x)``; with ``shared_expert_intermediate_size`` 0 the shared expert's projections
have no rows, its output is an empty sum, exactly 0 (transformers saves and loads these
zero-size tensors). The router: transformers takes softmax over all E logits, then top-k,
renormalised over the k when ``norm_topk_prob``; megatron with ``--moe-router-pre-softmax``
false takes top-k of the logits and a softmax over those k, the same weights
(exp(z_i) / sum over the k of exp(z_j)) for the same experts, so ``norm_topk_prob`` = not
pre-softmax (pre-softmax: softmax over all, top-k, not renormalised = norm_topk_prob false).
"""

from __future__ import annotations

import torch

from megatron_stgc.config import moe_layer_indices
from megatron_stgc.convert import moe_llava_names
from megatron_stgc.export.hf_vision import export_vision, select_strategy, vision_config
from megatron_stgc.export.lm_export import (ExportError, LMShape, State, export_dense_lm,
                                            without_router_biases)
from megatron_stgc.export.target import HfTarget


def part(state: State, name: str) -> State:
    """The keys of one model part (``language_model``, ...) without its prefix."""
    prefix = name + "."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def pre_softmax(config) -> bool:
    m = config.model
    return m.moe_router_topk == 1 if m.moe_router_pre_softmax is None else m.moe_router_pre_softmax


def export_qwen2_moe(lm_state: State, config) -> State:
    """Our MoE GPTModel state -> Qwen2MoeForCausalLM's (module docstring)."""
    shape = LMShape.of(config)
    views = moe_llava_names.split(without_router_biases(lm_state), "ours")
    out: State = {}
    for e in views.experts:
        dense = export_dense_lm(views.view(e), shape, "qwen2")
        for key, value in dense.items():
            layer = _moe_layer_of(key, views.moe_layers)
            if layer is None:
                out.setdefault(key, value)  # shared by every view
            else:
                head, leaf = key.split(".mlp.")
                out[f"{head}.mlp.experts.{e}.{leaf}"] = value
    h = config.model.hidden_size
    for i, router in views.routers.items():
        dtype, layer = router.dtype, f"model.layers.{i}.mlp."
        out[f"{layer}gate.weight"] = router
        out[f"{layer}shared_expert.gate_proj.weight"] = torch.zeros(0, h, dtype=dtype)
        out[f"{layer}shared_expert.up_proj.weight"] = torch.zeros(0, h, dtype=dtype)
        out[f"{layer}shared_expert.down_proj.weight"] = torch.zeros(h, 0, dtype=dtype)
        out[f"{layer}shared_expert_gate.weight"] = torch.zeros(1, h, dtype=dtype)
    return out


def _moe_layer_of(key: str, moe_layers: list[int]):
    if ".mlp." not in key or not key.startswith("model.layers."):
        return None
    layer = int(key.split(".")[2])
    return layer if layer in moe_layers else None


def language_state(lm_state: State, config, target: HfTarget) -> State:
    if target.moe:
        return export_qwen2_moe(lm_state, config)
    state = export_dense_lm(lm_state, LMShape.of(config), target.family)
    if target.family == "phi" and not target.vision and "lm_head.bias" not in state:
        # PhiForCausalLM's own head is biased (inside LLaVA the head is LLaVA's, unbiased)
        rows = state["model.embed_tokens.weight"].shape[0]
        state["lm_head.bias"] = torch.zeros(rows, dtype=state["model.embed_tokens.weight"].dtype)
    return state


def hf_state(state: State, config, target: HfTarget) -> State:
    """Our whole model's state (``model_state_for_export``) -> the HF weights to write."""
    lm = language_state(part(state, "language_model"), config, target)
    if not target.vision:
        return lm
    out = {f"language_model.{key}": value for key, value in lm.items()}
    out.update(export_vision(part(state, "vision_model"), config,
                             prefix="vision_tower.vision_model."))
    projector = part(state, "vision_projection")
    for ours, theirs in (("linear_fc1", "linear_1"), ("linear_fc2", "linear_2")):
        for name in ("weight", "bias"):
            key = f"encoder.{ours}.{name}"
            if key not in projector:
                raise ExportError(f"our projector has no {key!r} (mlp2x_gelu has two biased "
                                  "linears)")
            out[f"multi_modal_projector.{theirs}.{name}"] = projector[key]
    return out


def text_config(config, target: HfTarget, vocab_rows: int, tokenizer, dtype: torch.dtype):
    """transformers' config object of the language model."""
    import transformers

    m = config.model
    common = dict(
        vocab_size=vocab_rows, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups or m.num_attention_heads,
        max_position_embeddings=m.seq_length, tie_word_embeddings=LMShape.of(config).tied,
        eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
        rope_parameters={"rope_type": "default", "rope_theta": float(m.rotary_base)})
    if target.family == "qwen2" and target.moe:
        dense = [i for i in range(m.num_layers) if i not in moe_layer_indices(config)]
        cfg = transformers.Qwen2MoeConfig(
            **common, hidden_act="silu", rms_norm_eps=m.norm_epsilon, qkv_bias=True,
            num_experts=m.num_experts, num_experts_per_tok=m.moe_router_topk,
            moe_intermediate_size=m.moe_ffn_hidden_size, shared_expert_intermediate_size=0,
            decoder_sparse_step=1, mlp_only_layers=dense, norm_topk_prob=not pre_softmax(config),
            router_aux_loss_coef=m.moe_aux_loss_coeff)
    elif target.family == "qwen2":
        cfg = transformers.Qwen2Config(**common, hidden_act="silu", rms_norm_eps=m.norm_epsilon)
    elif target.family == "stablelm":
        common["rope_parameters"]["partial_rotary_factor"] = float(m.rotary_percent)
        cfg = transformers.StableLmConfig(**common, hidden_act="silu",
                                          layer_norm_eps=m.norm_epsilon,
                                          use_qkv_bias=m.add_qkv_bias)
    else:
        common["rope_parameters"]["partial_rotary_factor"] = float(m.rotary_percent)
        cfg = transformers.PhiConfig(**common, hidden_act="gelu_new",
                                     layer_norm_eps=m.norm_epsilon)
    cfg.dtype = dtype
    return cfg


def llava_config(config, text_cfg, image_token_id: int, dtype: torch.dtype):
    """transformers' LlavaConfig around ``text_cfg``: our tower, its last hidden state."""
    import transformers

    from megatron_stgc.model.vision import num_image_tokens

    cfg = transformers.LlavaConfig(
        vision_config=vision_config(config), text_config=text_cfg,
        image_token_index=image_token_id, image_seq_length=num_image_tokens(config),
        projector_hidden_act="gelu", vision_feature_select_strategy=select_strategy(config),
        vision_feature_layer=-1, multimodal_projector_bias=True,
        tie_word_embeddings=text_cfg.tie_word_embeddings)
    cfg.architectures = ["LlavaForConditionalGeneration"]
    cfg.dtype = dtype
    return cfg


def architecture(target: HfTarget) -> str:
    if target.vision:
        return "LlavaForConditionalGeneration"
    return {"qwen2": "Qwen2MoeForCausalLM" if target.moe else "Qwen2ForCausalLM",
            "stablelm": "StableLmForCausalLM", "phi": "PhiForCausalLM"}[target.family]
