"""transformers CLIPVisionModel -> megatron-core CLIPViTModel (TP=1).

Key mapping (HF prefix ``vision_model.``, found automatically, so CLIPModel and
LLaVA checkpoints work too; h = hidden size, P = (image_size / patch_size)^2)::

    embeddings.patch_embedding.weight [h, 3, p, p]   -> conv1.weight
    embeddings.class_embedding [h]                   -> class_token [1, 1, h]
    embeddings.position_embedding.weight [P + 1, h]  -> position_embeddings.weight
    pre_layrnorm.{weight,bias}                       -> ln_pre.{weight,bias}
    encoder.layers.i.layer_norm1                     -> decoder.layers.i.input_layernorm
    encoder.layers.i.self_attn.{q,k,v}_proj          -> decoder.layers.i.self_attention.linear_qkv
                                                        (per head j: q_j, k_j, v_j; fuse_qkv)
    encoder.layers.i.self_attn.out_proj              -> decoder.layers.i.self_attention.linear_proj
    encoder.layers.i.layer_norm2                     -> decoder.layers.i.pre_mlp_layernorm
    encoder.layers.i.mlp.fc1 / fc2                   -> decoder.layers.i.mlp.linear_fc1 / linear_fc2

Only the first ``num_layers`` encoder layers are converted. LLaVA feeds the
language model the PENULTIMATE layer's output (``mm_vision_select_layer=-2``),
i.e. HF ``hidden_states[num_hidden_layers - 1]``, so the default is
``num_hidden_layers - 1`` layers and megatron's output (which has no final
norm) is exactly that tensor. ``post_layernorm`` (pooled output only) and the
text tower are not used by LLaVA and are skipped.

Checked against MoE-LLaVA (``moellava/model/multimodal_encoder/clip_encoder.py:31-39``):
its CLIP tower returns ``hidden_states[mm_vision_select_layer]`` (-2 in every
``scripts/v1/*/finetune*.sh``) and, for the default ``mm_vision_select_feature`` 'patch',
drops token 0, the class token; ``hidden_states[0]`` is taken after ``pre_layrnorm``, as our
``ln_pre`` is applied. So this tower with ``num_hidden_layers - 1`` layers and
``--disable-vision-class-token`` computes MoE-LLaVA's image features:
tests/test_convert_llava.py (transformers' LLaVA with the same selection) and
tests/test_convert_moe_llava.py (MoE-LLaVA's layout), max abs logit diff ~2e-6.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from megatron_stgc.convert import ConversionError, find_prefix, fuse_qkv, take

WHAT = "CLIP vision model"


def _vision_config(hf_config):
    """A CLIPVisionConfig from a CLIPVisionConfig, CLIPConfig or LLaVA config."""
    config = getattr(hf_config, "vision_config", None) or hf_config
    model_type = getattr(config, "model_type", None)
    if model_type != "clip_vision_model":
        raise ConversionError(f"{WHAT}: expected a CLIP vision config (model_type "
                              f"'clip_vision_model'), got model_type {model_type!r}; only CLIP "
                              "vision towers can be converted")
    return config


def default_num_layers(hf_config) -> int:
    """LLaVA's choice: the penultimate layer's output, so all layers but the last."""
    return _vision_config(hf_config).num_hidden_layers - 1


def _check_supported(c, num_layers: int) -> None:
    problems = []
    if c.hidden_act != "quick_gelu":
        problems.append(f"hidden_act {c.hidden_act!r} (only 'quick_gelu')")
    if abs(c.layer_norm_eps - 1e-5) > 1e-12:
        problems.append(f"layer_norm_eps {c.layer_norm_eps} (only 1e-5)")
    if getattr(c, "num_channels", 3) != 3:
        problems.append(f"num_channels {c.num_channels} (only 3)")
    if c.image_size % c.patch_size:
        problems.append(f"image_size {c.image_size} not a multiple of patch_size {c.patch_size}")
    if not 1 <= num_layers <= c.num_hidden_layers:
        problems.append(f"num_layers {num_layers} outside [1, {c.num_hidden_layers}]")
    if problems:
        raise ConversionError(f"{WHAT}: unsupported configuration: {'; '.join(problems)}")


def clip_vision_flags(hf_vision_config, num_layers: Optional[int] = None) -> dict:
    """Our flag names -> values for a ViT that matches ``hf_vision_config``'s first layers."""
    c = _vision_config(hf_vision_config)
    num_layers = default_num_layers(c) if num_layers is None else num_layers
    _check_supported(c, num_layers)
    return {
        "vision_model_type": "clip",
        "vision_num_layers": num_layers,
        "vision_hidden_size": c.hidden_size,
        "vision_ffn_hidden_size": c.intermediate_size,
        "vision_num_attention_heads": c.num_attention_heads,
        "img_h": c.image_size,
        "img_w": c.image_size,
        "patch_dim": c.patch_size,
        "disable_vision_class_token": True,  # LLaVA drops the class token's output
    }


def encoder_layer(hf: dict, src: str, dst: str, heads: int,
                  what: str = WHAT) -> dict[str, torch.Tensor]:
    """One encoder layer: HF ``src`` prefix -> megatron ``dst`` prefix (CLIP and SigLIP
    encoder layers have the same names)."""
    attn = f"{src}self_attn."
    out = {}
    for name in ("weight", "bias"):
        out[f"{dst}input_layernorm.{name}"] = take(hf, f"{src}layer_norm1.{name}", what)
        out[f"{dst}self_attention.linear_qkv.{name}"] = fuse_qkv(
            *(take(hf, f"{attn}{p}_proj.{name}", what) for p in "qkv"), heads, heads)
        out[f"{dst}self_attention.linear_proj.{name}"] = take(hf, f"{attn}out_proj.{name}", what)
        out[f"{dst}pre_mlp_layernorm.{name}"] = take(hf, f"{src}layer_norm2.{name}", what)
        out[f"{dst}mlp.linear_fc1.{name}"] = take(hf, f"{src}mlp.fc1.{name}", what)
        out[f"{dst}mlp.linear_fc2.{name}"] = take(hf, f"{src}mlp.fc2.{name}", what)
    return out


def convert_clip_vision(hf_state_dict: dict, hf_vision_config,
                        num_layers: Optional[int] = None) -> dict[str, torch.Tensor]:
    """HF CLIP vision weights -> CLIPViTModel state dict (no ``_extra_state`` entries)."""
    c = _vision_config(hf_vision_config)
    num_layers = default_num_layers(c) if num_layers is None else num_layers
    _check_supported(c, num_layers)
    hf = hf_state_dict
    pre = find_prefix(hf, "embeddings.patch_embedding.weight", WHAT)
    h = c.hidden_size
    out = {
        "conv1.weight": take(hf, f"{pre}embeddings.patch_embedding.weight", WHAT),  # [h, 3, p, p]
        "class_token": take(hf, f"{pre}embeddings.class_embedding", WHAT).reshape(1, 1, h),
        "position_embeddings.weight": take(hf, f"{pre}embeddings.position_embedding.weight", WHAT),
        "ln_pre.weight": take(hf, f"{pre}pre_layrnorm.weight", WHAT),
        "ln_pre.bias": take(hf, f"{pre}pre_layrnorm.bias", WHAT),
    }
    for i in range(num_layers):
        out.update(encoder_layer(hf, f"{pre}encoder.layers.{i}.", f"decoder.layers.{i}.",
                                 c.num_attention_heads))
    return {key: value.detach().clone() for key, value in out.items()}


def load_hf_clip_vision(directory: str, log: Callable[[str], None] = print):
    """(state dict, vision config) of a CLIPVisionModel / CLIPModel save_pretrained directory."""
    from transformers import CLIPVisionModel

    log(f"loading the CLIP vision tower from {directory}")
    model = CLIPVisionModel.from_pretrained(directory)
    return model.state_dict(), model.config
