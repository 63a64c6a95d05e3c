"""transformers Qwen2ForCausalLM (Qwen2, Qwen2.5, Qwen1.5) -> dense megatron-core GPTModel (TP=1).

Key mapping (HF prefix ``model.``; h = hidden, d = h / heads, kv = K/V heads,
f = intermediate, V = HF vocab, V' = padded vocab)::

    embed_tokens.weight [V, h]          -> embedding.word_embeddings.weight [V', h] (rows V.. zero)
    layers.i.input_layernorm.weight     -> decoder.layers.i.input_layernorm.weight (RMSNorm)
    layers.i.self_attn.{q,k,v}_proj     -> decoder.layers.i.self_attention.linear_qkv (weight, bias;
                                           Qwen2 biases q/k/v only), fused per K/V group (fuse_qkv)
    layers.i.self_attn.o_proj.weight    -> decoder.layers.i.self_attention.linear_proj.weight
    layers.i.post_attention_layernorm   -> decoder.layers.i.pre_mlp_layernorm.weight
    layers.i.mlp.{gate,up}_proj         -> decoder.layers.i.mlp.linear_fc1 = cat(gate, up) [2f, h]
                                           (megatron's SwiGLU: silu(first half) * second half)
    layers.i.mlp.down_proj              -> decoder.layers.i.mlp.linear_fc2
    norm.weight                         -> decoder.final_layernorm.weight
    lm_head.weight [V, h]               -> output_layer.weight [V', h] (untied models only; the
                                           small Qwen2 models tie it to the embedding)

Rotary: full head, rotate-half, inv_freq = rope_theta^(-2j / d) in both (Qwen2: 1e6).
Unsupported (a ConversionError names them): sliding-window attention (use_sliding_window or
a layer_types entry other than full_attention), an activation other than SiLU, rope scaling,
a non-integer rope_theta, a head_dim other than h / heads.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_stgc.convert import find_prefix, fuse_qkv, take
from megatron_stgc.convert.lm_common import (attention_flags, detached, num_kv_heads,
                                             pad_vocab_rows, raise_problems,
                                             rope_and_head_problems)

WHAT = "Qwen2 model"
# MoE-LLaVA's Qwen1.5 models subclass transformers' Qwen2 classes
# (moellava/model/language_model/llava_qwen1_5.py:21-47)
MODEL_TYPES = ("qwen2", "llava_qwen1_5", "moe_llava_qwen1_5")


def _check_supported(c) -> None:
    problems = []
    if getattr(c, "model_type", "qwen2") not in MODEL_TYPES:
        problems.append(f"model_type {c.model_type!r} (only {', '.join(MODEL_TYPES)})")
    if getattr(c, "use_sliding_window", False):
        problems.append("use_sliding_window (sliding-window attention)")
    layer_types = set(getattr(c, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        problems.append(f"layer_types {sorted(layer_types)} (only full_attention)")
    if c.hidden_act != "silu":
        problems.append(f"hidden_act {c.hidden_act!r} (only 'silu')")
    raise_problems(WHAT, problems + rope_and_head_problems(c))


def qwen2_flags(hf_config) -> dict:
    """Our flag names -> values for a dense GPTModel equal to ``hf_config``'s model."""
    c = hf_config
    _check_supported(c)
    return {
        **attention_flags(c),
        "swiglu": True,
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "normalization": "RMSNorm",
        "norm_epsilon": float(c.rms_norm_eps),
    }


def _layer(hf: dict, src: str, dst: str, c) -> dict[str, torch.Tensor]:
    """One decoder layer: HF ``src`` prefix -> megatron ``dst`` prefix."""
    h, heads, kv, f = c.hidden_size, c.num_attention_heads, num_kv_heads(c), c.intermediate_size
    d = h // heads
    attn = f"{src}self_attn."
    rows = {"q": heads * d, "k": kv * d, "v": kv * d}

    def qkv(name: str) -> torch.Tensor:  # [(heads + 2 kv) * d, ...]
        return fuse_qkv(*(take(hf, f"{attn}{p}_proj.{name}", WHAT,
                               (rows[p], h) if name == "weight" else (rows[p],)) for p in "qkv"),
                        heads, kv)

    return {
        f"{dst}input_layernorm.weight": take(hf, f"{src}input_layernorm.weight", WHAT, (h,)),
        f"{dst}self_attention.linear_qkv.weight": qkv("weight"),
        f"{dst}self_attention.linear_qkv.bias": qkv("bias"),
        f"{dst}self_attention.linear_proj.weight": take(hf, f"{attn}o_proj.weight", WHAT,
                                                        (h, heads * d)),
        f"{dst}pre_mlp_layernorm.weight": take(hf, f"{src}post_attention_layernorm.weight", WHAT,
                                               (h,)),
        f"{dst}mlp.linear_fc1.weight": torch.cat([  # [2f, h]: gate, then up
            take(hf, f"{src}mlp.gate_proj.weight", WHAT, (f, h)),
            take(hf, f"{src}mlp.up_proj.weight", WHAT, (f, h))]),
        f"{dst}mlp.linear_fc2.weight": take(hf, f"{src}mlp.down_proj.weight", WHAT, (h, f)),
    }


def convert_qwen2(hf_state_dict: dict, hf_config,
                  padded_vocab_size: Optional[int] = None) -> dict[str, torch.Tensor]:
    """HF Qwen2 weights -> GPTModel state dict (vocab rows zero-padded to ``padded_vocab_size``,
    default: the HF vocab size)."""
    c = hf_config
    _check_supported(c)
    hf = hf_state_dict
    h, vocab = c.hidden_size, c.vocab_size
    rows = vocab if padded_vocab_size is None else padded_vocab_size
    pre = find_prefix(hf, "embed_tokens.weight", WHAT)
    out = {"embedding.word_embeddings.weight": pad_vocab_rows(
        take(hf, f"{pre}embed_tokens.weight", WHAT, (vocab, h)), rows, WHAT)}
    for i in range(c.num_hidden_layers):
        out.update(_layer(hf, f"{pre}layers.{i}.", f"decoder.layers.{i}.", c))
    out["decoder.final_layernorm.weight"] = take(hf, f"{pre}norm.weight", WHAT, (h,))
    if not c.tie_word_embeddings:
        head = find_prefix(hf, "lm_head.weight", WHAT) + "lm_head.weight"
        out["output_layer.weight"] = pad_vocab_rows(take(hf, head, WHAT, (vocab, h)), rows, WHAT)
    return detached(out)


def qwen2_config(config_json: dict):
    """transformers' Qwen2Config from a config.json dict (4.x or 5.x keys)."""
    from transformers import Qwen2Config

    return Qwen2Config.from_dict(config_json)
