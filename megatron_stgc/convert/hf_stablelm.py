"""transformers StableLmForCausalLM (StableLM-2 family) -> dense megatron-core GPTModel (TP=1).

Key mapping (HF prefix ``model.``; h = hidden, V = HF vocab, V' = padded vocab)::

    embed_tokens.weight [V, h]          -> embedding.word_embeddings.weight [V', h] (rows V.. zero)
    layers.i.input_layernorm            -> decoder.layers.i.input_layernorm (weight, bias)
    layers.i.self_attn.{q,k,v}_proj     -> decoder.layers.i.self_attention.linear_qkv (weight, bias
                                           with use_qkv_bias), fused per K/V group (fuse_qkv)
    layers.i.self_attn.o_proj           -> decoder.layers.i.self_attention.linear_proj
    layers.i.post_attention_layernorm   -> decoder.layers.i.pre_mlp_layernorm (weight, bias)
    layers.i.mlp.{gate,up}_proj         -> decoder.layers.i.mlp.linear_fc1 = cat(gate, up) [2f, h]
                                           (megatron's SwiGLU: silu(first half) * second half)
    layers.i.mlp.down_proj              -> decoder.layers.i.mlp.linear_fc2
    norm                                -> decoder.final_layernorm (weight, bias)
    lm_head.weight [V, h]               -> output_layer.weight [V', h] (untied models only)

The local megatron spec keeps the norms as separate modules (``input_layernorm``,
``pre_mlp_layernorm``); use ``to_te_layout`` for the Transformer Engine spec.

Rotary embeddings agree without any permutation: megatron-core's default
(``rotary_interleaved=False``) rotates the first ``rotary_percent * head_dim``
dims of every head with the rotate-half convention and inv_freq =
base^(-2j / rot_dim), exactly as transformers' StableLm does with
``partial_rotary_factor``; the remaining dims pass through unchanged.

Unsupported (a ConversionError names them): qk_layernorm, parallel residual,
an activation other than SiLU, rope scaling, a head_dim other than
hidden_size / num_attention_heads, and a non-integer rope_theta.
Grouped-query attention is supported through ``--num-query-groups``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from megatron_stgc.convert import find_prefix, fuse_qkv, take
from megatron_stgc.convert.lm_common import (attention_flags, num_kv_heads, pad_vocab_rows,
                                             raise_problems, rope_and_head_problems)

WHAT = "StableLM model"


def _check_supported(c) -> None:
    problems = []
    if getattr(c, "model_type", "stablelm") != "stablelm":
        problems.append(f"model_type {c.model_type!r} (only 'stablelm')")
    if getattr(c, "qk_layernorm", False):
        problems.append("qk_layernorm (per-head query/key LayerNorm)")
    if getattr(c, "use_parallel_residual", False):
        problems.append("use_parallel_residual (attention and MLP in parallel)")
    if c.hidden_act != "silu":
        problems.append(f"hidden_act {c.hidden_act!r} (only 'silu')")
    raise_problems(WHAT, problems + rope_and_head_problems(c))


def stablelm_flags(hf_config) -> dict:
    """Our flag names -> values for a dense GPTModel equal to ``hf_config``'s model."""
    c = hf_config
    _check_supported(c)
    return {
        **attention_flags(c),
        "swiglu": True,
        "add_bias_linear": False,
        "add_qkv_bias": bool(c.use_qkv_bias),
        "normalization": "LayerNorm",
        "norm_epsilon": float(c.layer_norm_eps),
    }


def _pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    return pad_vocab_rows(weight, rows, WHAT)


def _layer(hf: dict, src: str, dst: str, c) -> dict[str, torch.Tensor]:
    """One decoder layer: HF ``src`` prefix -> megatron ``dst`` prefix."""
    attn = f"{src}self_attn."

    def qkv(name: str) -> torch.Tensor:
        return fuse_qkv(*(take(hf, f"{attn}{p}_proj.{name}", WHAT) for p in "qkv"),
                        c.num_attention_heads, num_kv_heads(c))

    out = {
        f"{dst}self_attention.linear_qkv.weight": qkv("weight"),  # [(heads + 2 kv) * d, h]
        f"{dst}self_attention.linear_proj.weight": take(hf, f"{attn}o_proj.weight", WHAT),
        f"{dst}mlp.linear_fc1.weight": torch.cat([take(hf, f"{src}mlp.gate_proj.weight", WHAT),
                                                  take(hf, f"{src}mlp.up_proj.weight", WHAT)]),
        f"{dst}mlp.linear_fc2.weight": take(hf, f"{src}mlp.down_proj.weight", WHAT),
    }
    if c.use_qkv_bias:
        out[f"{dst}self_attention.linear_qkv.bias"] = qkv("bias")
    for name in ("weight", "bias"):
        out[f"{dst}input_layernorm.{name}"] = take(hf, f"{src}input_layernorm.{name}", WHAT)
        out[f"{dst}pre_mlp_layernorm.{name}"] = take(
            hf, f"{src}post_attention_layernorm.{name}", WHAT)
    return out


def convert_stablelm(hf_state_dict: dict, hf_config,
                     padded_vocab_size: Optional[int] = None) -> dict[str, torch.Tensor]:
    """HF StableLM weights -> GPTModel state dict (vocab rows zero-padded to ``padded_vocab_size``,
    default: the HF vocab size)."""
    c = hf_config
    _check_supported(c)
    hf = hf_state_dict
    pre = find_prefix(hf, "embed_tokens.weight", WHAT)
    rows = c.vocab_size if padded_vocab_size is None else padded_vocab_size
    out = {"embedding.word_embeddings.weight": _pad_rows(take(hf, f"{pre}embed_tokens.weight",
                                                              WHAT), rows)}
    for i in range(c.num_hidden_layers):
        out.update(_layer(hf, f"{pre}layers.{i}.", f"decoder.layers.{i}.", c))
    out["decoder.final_layernorm.weight"] = take(hf, f"{pre}norm.weight", WHAT)
    out["decoder.final_layernorm.bias"] = take(hf, f"{pre}norm.bias", WHAT)
    if not c.tie_word_embeddings:
        head = find_prefix(hf, "lm_head.weight", WHAT) + "lm_head.weight"
        out["output_layer.weight"] = _pad_rows(take(hf, head, WHAT), rows)
    return {key: value.detach().clone() for key, value in out.items()}


def load_hf_stablelm(directory: str, log: Callable[[str], None] = print):
    """(state dict, config) of a StableLmForCausalLM save_pretrained directory."""
    from transformers import AutoConfig, StableLmForCausalLM

    config = AutoConfig.from_pretrained(directory)
    _check_supported(config)  # fail before loading gigabytes of weights
    log(f"loading the StableLM language model from {directory}")
    model = StableLmForCausalLM.from_pretrained(directory)
    return model.state_dict(), model.config
