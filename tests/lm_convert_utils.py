"""Tiny random transformers language models of every family the converter knows, and the
megatron side of the logit comparison (tests/test_convert_lm_families.py)."""

from __future__ import annotations

import json
import os

import torch
import transformers

HF_VOCAB, PADDED_VOCAB = 100, 128
TOKENS = 12


def perturbed(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Add noise to every parameter, so zero-initialised biases and unit norms count too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()


def tiny_phi(kv_heads: int = 4, **overrides):
    """Phi-2's layout at toy size: parallel block, 40% partial rotary, biased everything."""
    config = transformers.PhiConfig(
        vocab_size=HF_VOCAB, hidden_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, intermediate_size=160, partial_rotary_factor=0.4,
        **overrides)
    torch.manual_seed(0)
    return perturbed(transformers.PhiForCausalLM(config))


def tiny_qwen2(kv_heads: int = 2, tied: bool = False, **overrides):
    config = transformers.Qwen2Config(
        vocab_size=HF_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, intermediate_size=128, rope_theta=1000000.0,
        tie_word_embeddings=tied, **overrides)
    torch.manual_seed(0)
    return perturbed(transformers.Qwen2ForCausalLM(config))


def tiny_stablelm(kv_heads: int = 2, tied: bool = False):
    config = transformers.StableLmConfig(
        vocab_size=HF_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, intermediate_size=128, partial_rotary_factor=0.25,
        use_qkv_bias=True, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return perturbed(transformers.StableLmForCausalLM(config))


def qwen1_state_and_config(qwen2) -> tuple[dict, dict]:
    """A Qwen-1 (QWenLMHeadModel) state dict and config.json made by renaming a Qwen2 model
    with as many K/V heads as query heads (Qwen-1 has no GQA). The renaming is Qwen-1's
    layout as modeling_qwen.py defines it (see megatron_stgc/convert/hf_qwen.py): c_attn =
    [q | k | v] rows, w2 = the SiLU-gated projection (Qwen2's gate_proj), w1 = up_proj,
    c_proj = down_proj; intermediate_size is twice the projections' width."""
    c = qwen2.config
    assert c.num_key_value_heads == c.num_attention_heads and not c.tie_word_embeddings
    hf = qwen2.state_dict()
    state = {"transformer.wte.weight": hf["model.embed_tokens.weight"],
             "transformer.ln_f.weight": hf["model.norm.weight"],
             "lm_head.weight": hf["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
        attn = f"{src}self_attn."
        for name in ("weight", "bias"):
            state[f"{dst}attn.c_attn.{name}"] = torch.cat(
                [hf[f"{attn}{p}_proj.{name}"] for p in "qkv"])
        state.update({
            f"{dst}ln_1.weight": hf[f"{src}input_layernorm.weight"],
            f"{dst}attn.c_proj.weight": hf[f"{attn}o_proj.weight"],
            f"{dst}ln_2.weight": hf[f"{src}post_attention_layernorm.weight"],
            f"{dst}mlp.w1.weight": hf[f"{src}mlp.up_proj.weight"],
            f"{dst}mlp.w2.weight": hf[f"{src}mlp.gate_proj.weight"],
            f"{dst}mlp.c_proj.weight": hf[f"{src}mlp.down_proj.weight"],
        })
    config = {  # Qwen-1's config.json keys (configuration_qwen.py)
        "architectures": ["QWenLMHeadModel"], "model_type": "qwen",
        "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                     "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "kv_channels": c.hidden_size // c.num_attention_heads,
        "intermediate_size": 2 * c.intermediate_size, "layer_norm_epsilon": c.rms_norm_eps,
        "rotary_pct": 1.0, "rotary_emb_base": int(c.rope_parameters["rope_theta"]),
        "seq_length": 8192, "no_bias": True, "tie_word_embeddings": False,
        "use_dynamic_ntk": True, "use_logn_attn": True}
    return state, config


def save_qwen1(qwen2, directory) -> None:
    """config.json + model.safetensors of the renamed Qwen-1 model (what a Qwen-1 repo holds,
    minus the remote-code files, which the converter never reads)."""
    from safetensors.torch import save_file

    state, config = qwen1_state_and_config(qwen2)
    os.makedirs(directory, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()},
              os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)


def megatron_gpt(flags: dict, state: dict, **overrides):
    from megatron_stgc.config import config_from_flat
    from megatron_stgc.convert import load_converted
    from megatron_stgc.model.gpt import build_gpt_model

    gpt = build_gpt_model(config_from_flat({**flags, "seq_length": 16, **overrides}),
                          PADDED_VOCAB).eval()
    load_converted(gpt, state)
    return gpt


def sample_tokens(seed: int = 3) -> torch.Tensor:
    return torch.randint(0, HF_VOCAB, (2, TOKENS), generator=torch.Generator().manual_seed(seed))


def max_logit_diff(gpt, hf) -> float:
    """max |our logits - HF logits| on the same tokens; our padding rows must stay zero."""
    tokens = sample_tokens()
    positions = torch.arange(TOKENS).expand(2, -1)
    with torch.no_grad():
        ours = gpt(tokens, positions, None)  # [2, 12, 128]
        theirs = hf(input_ids=tokens).logits  # [2, 12, 100]
    assert ours.shape == (2, TOKENS, PADDED_VOCAB) and theirs.shape == (2, TOKENS, HF_VOCAB)
    assert ours[..., HF_VOCAB:].abs().max().item() == 0.0  # zero rows for the padding
    return (ours[..., :HF_VOCAB] - theirs).abs().max().item()
