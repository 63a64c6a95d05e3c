"""Qwen-1 (remote-code ``QWenLMHeadModel``, MoE-LLaVA-Qwen's Qwen-1.8B) -> dense GPTModel (TP=1).

Read from config.json and the weight files alone: the remote code is never imported or run.
Names and semantics are from Alibaba's modeling_qwen.py as MoE-LLaVA vendors it
(moellava/model/language_model/qwen/modeling_qwen.py, cited below as mq:LINE;
configuration_qwen.py as cq:LINE). Key mapping (h = hidden, d = kv_channels, heads = K/V
heads (no GQA), f = intermediate_size // 2, V = HF vocab, V' = padded vocab)::

    transformer.wte.weight [V, h]        -> embedding.word_embeddings.weight [V', h]
    transformer.h.i.ln_1.weight          -> decoder.layers.i.input_layernorm.weight (RMSNorm,
                                            mq:584, mq:1350-1364: x * rsqrt(mean(x^2) + eps) * w)
    transformer.h.i.attn.c_attn [3h, h]  -> decoder.layers.i.self_attention.linear_qkv (weight,
                                            bias): rows [q | k | v] (mq:269, split by hidden size
                                            mq:418), each [heads * d], re-fused per head (fuse_qkv)
    transformer.h.i.attn.c_proj.weight   -> decoder.layers.i.self_attention.linear_proj.weight
                                            (biased only with no_bias false, mq:271)
    transformer.h.i.ln_2.weight          -> decoder.layers.i.pre_mlp_layernorm.weight
    transformer.h.i.mlp.w2 / w1 [f, h]   -> decoder.layers.i.mlp.linear_fc1 = cat(w2, w1) [2f, h]:
                                            Qwen computes w1(x) * silu(w2(x)) (mq:571-573), so
                                            w2 is the gated half, megatron's first
    transformer.h.i.mlp.c_proj [h, f]    -> decoder.layers.i.mlp.linear_fc2
    transformer.ln_f.weight              -> decoder.final_layernorm.weight
    lm_head.weight [V, h]                -> output_layer.weight [V', h] (mq:980, untied)

Rotary (mq:1273-1347): inv_freq = rotary_emb_base^(-2j / rot), cos/sin of cat(freqs, freqs),
rotate-half on the first ``rotary_pct * kv_channels`` dims: megatron's default rotary.
Where the two can differ: Qwen-1's inference-time length extrapolation, dynamic NTK
(mq:833-847) and logn attention scaling (mq:482-490), both only once a sequence is longer
than config.json's ``seq_length`` (8192 for Qwen-1.8B; with ntk_alpha 1 and a logn factor
of 1 below it), are not implemented; training and evaluation shorter than that are the
same function. Unsupported (a ConversionError names them): kv_channels * heads != hidden
(Qwen splits c_attn by the hidden size), rotary_pct outside (0, 1], a non-integer base.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch

from megatron_stgc.convert import find_prefix, fuse_qkv, take
from megatron_stgc.convert.lm_common import detached, pad_vocab_rows, raise_problems

WHAT = "Qwen-1 model"
MODEL_TYPES = ("qwen", "llava_qwen", "moe_llava_qwen")  # MoE-LLaVA's Qwen classes subclass it
# QWenConfig's defaults (cq:13-40) for keys a config.json may leave out
DEFAULTS = dict(emb_dropout_prob=0.0, attn_dropout_prob=0.0, layer_norm_epsilon=1e-6,
                kv_channels=128, rotary_pct=1.0, rotary_emb_base=10000, use_dynamic_ntk=True,
                use_logn_attn=True, intermediate_size=22016, no_bias=True,
                tie_word_embeddings=False)


def qwen_config(config_json: dict) -> SimpleNamespace:
    """The attributes the converter reads, from a Qwen-1 config.json (no remote code)."""
    return SimpleNamespace(**{**DEFAULTS, **config_json})


def _check_supported(c) -> None:
    problems = []
    if getattr(c, "model_type", "qwen") not in MODEL_TYPES:
        problems.append(f"model_type {c.model_type!r} (only {', '.join(MODEL_TYPES)})")
    if c.kv_channels * c.num_attention_heads != c.hidden_size:
        problems.append(f"kv_channels {c.kv_channels} x num_attention_heads "
                        f"{c.num_attention_heads} != hidden_size {c.hidden_size}")
    if not 0 < c.rotary_pct <= 1:
        problems.append(f"rotary_pct {c.rotary_pct} (only (0, 1])")
    if float(c.rotary_emb_base) != int(c.rotary_emb_base):
        problems.append(f"rotary_emb_base {c.rotary_emb_base} (only integers)")
    if c.intermediate_size % 2:
        problems.append(f"intermediate_size {c.intermediate_size} (w1/w2 are half of it)")
    raise_problems(WHAT, problems)


def qwen_flags(hf_config) -> dict:
    """Our flag names -> values for a dense GPTModel equal to the Qwen-1 model."""
    c = hf_config
    _check_supported(c)
    return {
        "num_layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "ffn_hidden_size": c.intermediate_size // 2,
        "num_attention_heads": c.num_attention_heads,
        "num_query_groups": None,
        "num_experts": None,  # dense; --moe-use-upcycling turns the FFNs into experts
        "swiglu": True,
        "add_bias_linear": not c.no_bias,
        "add_qkv_bias": True,
        "position_embedding_type": "rope",
        "rotary_percent": float(c.rotary_pct),
        "rotary_base": int(c.rotary_emb_base),
        "normalization": "RMSNorm",
        "norm_epsilon": float(c.layer_norm_epsilon),
        "untie_embeddings_and_output_weights": not c.tie_word_embeddings,
    }


def _layer(hf: dict, src: str, dst: str, c) -> dict[str, torch.Tensor]:
    """One block: HF ``src`` prefix (transformer.h.i.) -> megatron ``dst`` prefix."""
    h, heads, f = c.hidden_size, c.num_attention_heads, c.intermediate_size // 2

    def qkv(name: str) -> torch.Tensor:  # [3h, ...] = [q | k | v] -> per head [q_j k_j v_j]
        fused = take(hf, f"{src}attn.c_attn.{name}", WHAT, (3 * h, h) if name == "weight"
                     else (3 * h,))
        return fuse_qkv(*fused.split(h), heads, heads)

    out = {
        f"{dst}input_layernorm.weight": take(hf, f"{src}ln_1.weight", WHAT, (h,)),
        f"{dst}self_attention.linear_qkv.weight": qkv("weight"),
        f"{dst}self_attention.linear_qkv.bias": qkv("bias"),
        f"{dst}self_attention.linear_proj.weight": take(hf, f"{src}attn.c_proj.weight", WHAT,
                                                        (h, h)),
        f"{dst}pre_mlp_layernorm.weight": take(hf, f"{src}ln_2.weight", WHAT, (h,)),
        f"{dst}mlp.linear_fc1.weight": torch.cat([  # [2f, h]: gated w2 first, then w1
            take(hf, f"{src}mlp.w2.weight", WHAT, (f, h)),
            take(hf, f"{src}mlp.w1.weight", WHAT, (f, h))]),
        f"{dst}mlp.linear_fc2.weight": take(hf, f"{src}mlp.c_proj.weight", WHAT, (h, f)),
    }
    if not c.no_bias:
        out[f"{dst}self_attention.linear_proj.bias"] = take(hf, f"{src}attn.c_proj.bias", WHAT,
                                                            (h,))
        out[f"{dst}mlp.linear_fc1.bias"] = torch.cat([
            take(hf, f"{src}mlp.w2.bias", WHAT, (f,)), take(hf, f"{src}mlp.w1.bias", WHAT, (f,))])
        out[f"{dst}mlp.linear_fc2.bias"] = take(hf, f"{src}mlp.c_proj.bias", WHAT, (h,))
    return out


def convert_qwen(hf_state_dict: dict, hf_config,
                 padded_vocab_size: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Qwen-1 weights -> GPTModel state dict (vocab rows zero-padded to ``padded_vocab_size``,
    default: the HF vocab size)."""
    c = hf_config
    _check_supported(c)
    hf = hf_state_dict
    h, vocab = c.hidden_size, c.vocab_size
    rows = vocab if padded_vocab_size is None else padded_vocab_size
    pre = find_prefix(hf, "wte.weight", WHAT)  # "transformer."
    out = {"embedding.word_embeddings.weight": pad_vocab_rows(
        take(hf, f"{pre}wte.weight", WHAT, (vocab, h)), rows, WHAT)}
    for i in range(c.num_hidden_layers):
        out.update(_layer(hf, f"{pre}h.{i}.", f"decoder.layers.{i}.", c))
    out["decoder.final_layernorm.weight"] = take(hf, f"{pre}ln_f.weight", WHAT, (h,))
    if not c.tie_word_embeddings:
        head = find_prefix(hf, "lm_head.weight", WHAT) + "lm_head.weight"
        out["output_layer.weight"] = pad_vocab_rows(take(hf, head, WHAT, (vocab, h)), rows, WHAT)
    return detached(out)
