"""What the language-model converters share: rotary settings, K/V heads, vocab padding, and
the checks every family runs on its config.

Config objects are read by attribute, so a transformers config (4.x or 5.x), MoE-LLaVA's
own config classes, or a plain namespace from config.json (Qwen-1) all work.
"""

from __future__ import annotations

import torch

from megatron_stgc.convert import ConversionError


def rope_settings(c) -> tuple[float, float, str]:
    """(rope_theta, partial_rotary_factor, rope_type) from transformers 4.x or 5.x configs."""
    params = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(c, "rope_theta", 10000.0))
    factor = params.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0))
    return theta, factor, params.get("rope_type", params.get("type", "default"))


def num_kv_heads(c) -> int:
    return getattr(c, "num_key_value_heads", None) or c.num_attention_heads


def rope_and_head_problems(c) -> list[str]:
    """Rotary and attention-shape features the megatron model here does not have."""
    theta, _, rope_type = rope_settings(c)
    heads, kv_heads = c.num_attention_heads, num_kv_heads(c)
    head_dim = getattr(c, "head_dim", None)
    problems = []
    if rope_type != "default":
        problems.append(f"rope_type {rope_type!r} (only 'default', no rope scaling)")
    if float(theta) != int(theta):
        problems.append(f"rope_theta {theta} (only integers)")
    if heads % kv_heads:
        problems.append(f"num_key_value_heads {kv_heads} does not divide "
                        f"num_attention_heads {heads}")
    if head_dim is not None and head_dim * heads != c.hidden_size:
        problems.append(f"head_dim {head_dim} != hidden_size / num_attention_heads")
    return problems


def raise_problems(what: str, problems: list[str]) -> None:
    if problems:
        raise ConversionError(f"{what}: unsupported configuration: {'; '.join(problems)}")


def pad_vocab_rows(weight: torch.Tensor, rows: int, what: str) -> torch.Tensor:
    """[V, ...] -> [rows, ...], the added rows zero (an embedding, LM head or its bias)."""
    if rows < weight.shape[0]:
        raise ConversionError(f"{what}: padded vocab size {rows} is smaller than the model's "
                              f"vocabulary ({weight.shape[0]})")
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], *weight.shape[1:])])


def attention_flags(c) -> dict:
    """The flags every family derives the same way from a transformers-style config."""
    theta, factor, _ = rope_settings(c)
    kv_heads = num_kv_heads(c)
    return {
        "num_layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "ffn_hidden_size": c.intermediate_size,
        "num_attention_heads": c.num_attention_heads,
        "num_query_groups": None if kv_heads == c.num_attention_heads else kv_heads,
        "num_experts": None,  # dense; --moe-use-upcycling turns the FFNs into experts
        "position_embedding_type": "rope",
        "rotary_percent": float(factor),
        "rotary_base": int(theta),
        "untie_embeddings_and_output_weights": not c.tie_word_embeddings,
    }


def detached(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Own copies, so the converted state shares no storage with the HF tensors."""
    return {key: value.detach().clone() for key, value in state.items()}
