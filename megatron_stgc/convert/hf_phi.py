"""transformers PhiForCausalLM (Phi-2) -> dense megatron-core GPTModel with the parallel block.

MoE-LLaVA's Phi models (``llava_phi``, ``moe_llava_phi``) are this class too: MoE-LLaVA
vendors transformers' Phi (moellava/model/language_model/phi/modeling_phi.py, the
``model.layers.i.self_attn.{q,k,v}_proj / dense``, ``mlp.fc1 / fc2``, ``input_layernorm``,
``final_layernorm`` names below) and subclasses its PhiForCausalLM
(moellava/model/language_model/llava_phi.py:41-51), except that it replaces the LM head with
an UNBIASED one (llava_phi.py:49, llava_phi_moe.py:303: ``nn.Linear(..., bias=False)``), so
a Phi-2 started from microsoft/phi-2 there loses its head bias. Configs of those model
types convert without ``output_layer.bias``; model_type ``phi`` converts with it.

Key mapping (HF prefix ``model.``; h = hidden, d = h / heads, f = intermediate,
V = HF vocab, V' = padded vocab)::

    embed_tokens.weight [V, h]          -> embedding.word_embeddings.weight [V', h] (rows V.. zero)
    layers.i.input_layernorm            -> decoder.layers.i.input_layernorm (weight, bias); the
                                           one norm of the layer: attention and MLP both read it
    layers.i.self_attn.{q,k,v}_proj     -> decoder.layers.i.self_attention.linear_qkv (weight,
                                           bias), fused per K/V group (fuse_qkv)
    layers.i.self_attn.dense            -> decoder.layers.i.self_attention.linear_proj (w, b)
    layers.i.mlp.fc1 / fc2              -> decoder.layers.i.mlp.linear_fc1 / linear_fc2 (w, b)
    final_layernorm                     -> decoder.final_layernorm (weight, bias)
    lm_head.weight [V, h], bias [V]     -> output_layer.weight [V', h], output_layer.bias [V']

Flags: ``--parallel-attention-mlp`` (model/parallel_block.py: h = x + attn(ln(x)) +
mlp(ln(x)), PhiDecoderLayer), ``--openai-gelu`` (hidden_act "gelu_new" is GELU's tanh
approximation), ``--add-bias-linear`` (q/k/v, dense, fc1, fc2 all biased),
``--add-output-layer-bias``, partial rotary through ``--rotary-percent`` (Phi-2: 0.4; the
first 0.4 * head_dim dims of each head, rotate-half convention, as megatron's default).

Unsupported (a ConversionError names them): qk_layernorm, an activation other than
gelu_new, rope scaling, a non-integer rope_theta, a head_dim other than h / heads, and the
pre-2024 microsoft/phi-2 remote-code layout (``transformer.h.i.mixer.Wqkv``).
Dropout (resid_pdrop, embd_pdrop) is a training setting, not converted.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_stgc.convert import ConversionError, find_prefix, fuse_qkv, take
from megatron_stgc.convert.lm_common import (attention_flags, detached, num_kv_heads,
                                             pad_vocab_rows, raise_problems,
                                             rope_and_head_problems)

WHAT = "Phi model"
MODEL_TYPES = ("phi", "llava_phi", "moe_llava_phi")
UNBIASED_HEAD_MODEL_TYPES = ("llava_phi", "moe_llava_phi")  # MoE-LLaVA's own head


def has_head_bias(c) -> bool:
    """Phi's own head is biased, MoE-LLaVA's is not; ``c.head_bias`` (set by the LLaVA importer:
    transformers' LLaVA owns an unbiased ``lm_head`` too) overrides the model_type rule."""
    explicit = getattr(c, "head_bias", None)
    if explicit is not None:
        return bool(explicit)
    return getattr(c, "model_type", "phi") not in UNBIASED_HEAD_MODEL_TYPES


def _check_supported(c) -> None:
    problems = []
    if getattr(c, "model_type", "phi") not in MODEL_TYPES:
        problems.append(f"model_type {c.model_type!r} (only {', '.join(MODEL_TYPES)})")
    if getattr(c, "qk_layernorm", False):
        problems.append("qk_layernorm (per-head query/key LayerNorm)")
    if c.hidden_act != "gelu_new":
        problems.append(f"hidden_act {c.hidden_act!r} (only 'gelu_new')")
    raise_problems(WHAT, problems + rope_and_head_problems(c))


def phi_flags(hf_config) -> dict:
    """Our flag names -> values for a dense GPTModel equal to ``hf_config``'s model."""
    c = hf_config
    _check_supported(c)
    return {
        **attention_flags(c),
        "parallel_attention_mlp": True,
        "openai_gelu": True,
        "swiglu": False,
        "add_bias_linear": True,
        "add_qkv_bias": True,
        "add_output_layer_bias": has_head_bias(c),
        "normalization": "LayerNorm",
        "norm_epsilon": float(c.layer_norm_eps),
    }


def _layer(hf: dict, src: str, dst: str, c) -> dict[str, torch.Tensor]:
    """One decoder layer: HF ``src`` prefix -> megatron ``dst`` prefix."""
    h, heads, kv, f = c.hidden_size, c.num_attention_heads, num_kv_heads(c), c.intermediate_size
    d = h // heads
    attn = f"{src}self_attn."
    shapes = {"q": heads * d, "k": kv * d, "v": kv * d}
    out = {}
    for name in ("weight", "bias"):
        rest = (h,) if name == "weight" else ()
        out[f"{dst}self_attention.linear_qkv.{name}"] = fuse_qkv(  # [(heads + 2 kv) * d, ...]
            *(take(hf, f"{attn}{p}_proj.{name}", WHAT, (shapes[p], *rest)) for p in "qkv"),
            heads, kv)
        out[f"{dst}self_attention.linear_proj.{name}"] = take(
            hf, f"{attn}dense.{name}", WHAT, (h, heads * d) if name == "weight" else (h,))
        out[f"{dst}mlp.linear_fc1.{name}"] = take(hf, f"{src}mlp.fc1.{name}", WHAT,
                                                  (f, h) if name == "weight" else (f,))
        out[f"{dst}mlp.linear_fc2.{name}"] = take(hf, f"{src}mlp.fc2.{name}", WHAT,
                                                  (h, f) if name == "weight" else (h,))
        out[f"{dst}input_layernorm.{name}"] = take(hf, f"{src}input_layernorm.{name}", WHAT,
                                                   (h,))
    return out


def _check_layout(hf: dict) -> None:
    old = next((key for key in hf if ".mixer.Wqkv." in key), None)
    if old is not None:
        raise ConversionError(f"{WHAT}: {old!r} is the pre-2024 microsoft/phi-2 remote-code "
                              "layout, not transformers' PhiForCausalLM; use the current "
                              "microsoft/phi-2 revision (model.layers.i.self_attn.q_proj ...)")


def convert_phi(hf_state_dict: dict, hf_config,
                padded_vocab_size: Optional[int] = None) -> dict[str, torch.Tensor]:
    """HF Phi weights -> GPTModel state dict (vocab rows zero-padded to ``padded_vocab_size``,
    default: the HF vocab size)."""
    c = hf_config
    _check_supported(c)
    hf = hf_state_dict
    _check_layout(hf)
    h, vocab = c.hidden_size, c.vocab_size
    rows = vocab if padded_vocab_size is None else padded_vocab_size
    pre = find_prefix(hf, "embed_tokens.weight", WHAT)
    out = {"embedding.word_embeddings.weight": pad_vocab_rows(
        take(hf, f"{pre}embed_tokens.weight", WHAT, (vocab, h)), rows, WHAT)}
    for i in range(c.num_hidden_layers):
        out.update(_layer(hf, f"{pre}layers.{i}.", f"decoder.layers.{i}.", c))
    for name in ("weight", "bias"):
        out[f"decoder.final_layernorm.{name}"] = take(hf, f"{pre}final_layernorm.{name}", WHAT,
                                                      (h,))
    if not c.tie_word_embeddings:
        head = find_prefix(hf, "lm_head.weight", WHAT) + "lm_head.weight"
        out["output_layer.weight"] = pad_vocab_rows(take(hf, head, WHAT, (vocab, h)), rows, WHAT)
    bias = next((key for key in hf if key.endswith("lm_head.bias")), None)
    if has_head_bias(c):
        bias = bias or find_prefix(hf, "lm_head.bias", WHAT) + "lm_head.bias"
        out["output_layer.bias"] = pad_vocab_rows(take(hf, bias, WHAT, (vocab,)), rows, WHAT)
    elif bias is not None:
        raise ConversionError(f"{WHAT}: model_type {c.model_type!r} has an unbiased LM head "
                              f"(MoE-LLaVA's), but the weights hold {bias!r}")
    return detached(out)


def phi_config(config_json: dict):
    """transformers' PhiConfig from a config.json dict (4.x or 5.x keys)."""
    from transformers import PhiConfig

    return PhiConfig.from_dict(config_json)
