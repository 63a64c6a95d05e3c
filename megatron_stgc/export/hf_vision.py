"""Our vision tower (megatron-core CLIPViTModel, model/vision.py) -> transformers'
CLIPVisionModel / SiglipVisionModel names and config: the inverse of convert/hf_clip.py and
convert/hf_siglip.py (their docstrings hold the key tables)::

    conv1.weight (SigLIP: + .bias)            -> vision_model.embeddings.patch_embedding.*
    class_token [1, 1, h] (CLIP)              -> vision_model.embeddings.class_embedding [h]
    position_embeddings.weight                -> vision_model.embeddings.position_embedding.weight
    ln_pre.* (CLIP)                           -> vision_model.pre_layrnorm.*
    decoder.layers.i.input_layernorm          -> vision_model.encoder.layers.i.layer_norm1
    decoder.layers.i.self_attention.linear_qkv -> ...self_attn.{q,k,v}_proj (heads = groups)
    decoder.layers.i.self_attention.linear_proj -> ...self_attn.out_proj
    decoder.layers.i.pre_mlp_layernorm        -> ...layer_norm2
    decoder.layers.i.mlp.linear_fc1 / fc2     -> ...mlp.fc1 / fc2

Our tower ends at the hidden state LLaVA selects (it keeps the layers up to it and has no
final norm), so the written tower has our N layers and the selection is its LAST hidden state
(transformers' LLaVA: ``vision_feature_layer`` -1). transformers' towers always own a
``post_layernorm`` (used only for the pooled / last_hidden_state output, never for
``hidden_states``): it is written as the identity (weight 1, bias 0). SigLIP is written
without its attention-pooling head (``vision_use_head`` false).

``identity_layers`` appends layers that change nothing (every weight 0, norm weights 1:
attention and MLP both add 0 to the residual stream): MoE-LLaVA selects ``hidden_states[-2]``,
so its layout gets one such layer after ours and keeps its -2 (moe_llava_format.py).
"""

from __future__ import annotations

import torch

from megatron_stgc.export.lm_export import ExportError, State, unfuse_qkv

CLIP_GELU, SIGLIP_GELU = "quick_gelu", "gelu_pytorch_tanh"


def vision_config(config, extra_layers: int = 0):
    """transformers' CLIPVisionConfig / SiglipVisionConfig of our tower (+ extra layers)."""
    import transformers

    v = config.vision
    if v.img_h != v.img_w:
        raise ExportError(f"--img-h {v.img_h} and --img-w {v.img_w} differ; transformers' CLIP "
                          "and SigLIP towers take square images only")
    common = dict(hidden_size=v.vision_hidden_size, intermediate_size=v.vision_ffn_hidden_size,
                  num_hidden_layers=v.vision_num_layers + extra_layers,
                  num_attention_heads=v.vision_num_attention_heads, image_size=v.img_h,
                  patch_size=v.patch_dim, num_channels=3)
    if v.vision_model_type == "clip":
        return transformers.CLIPVisionConfig(**common, hidden_act=CLIP_GELU, layer_norm_eps=1e-5)
    return transformers.SiglipVisionConfig(**common, hidden_act=SIGLIP_GELU, layer_norm_eps=1e-6,
                                           vision_use_head=False)


def _layer(state: State, src: str, dst: str, heads: int) -> State:
    out = {}
    for name in ("weight", "bias"):
        out[f"{dst}layer_norm1.{name}"] = state[f"{src}input_layernorm.{name}"]
        q, k, v = unfuse_qkv(state[f"{src}self_attention.linear_qkv.{name}"], heads, heads)
        out.update({f"{dst}self_attn.q_proj.{name}": q, f"{dst}self_attn.k_proj.{name}": k,
                    f"{dst}self_attn.v_proj.{name}": v})
        out[f"{dst}self_attn.out_proj.{name}"] = state[f"{src}self_attention.linear_proj.{name}"]
        out[f"{dst}layer_norm2.{name}"] = state[f"{src}pre_mlp_layernorm.{name}"]
        out[f"{dst}mlp.fc1.{name}"] = state[f"{src}mlp.linear_fc1.{name}"]
        out[f"{dst}mlp.fc2.{name}"] = state[f"{src}mlp.linear_fc2.{name}"]
    return out


def _identity_layer(template: State, src: str, dst: str) -> State:
    """A layer shaped like ``src``'s whose output equals its input (see the module docstring)."""
    layer = _layer(template, src, dst, heads=1)  # heads do not matter for zeros
    return {key: (torch.ones_like(value) if ("layer_norm" in key and key.endswith(".weight"))
                  else torch.zeros_like(value)) for key, value in layer.items()}


def export_vision(state: State, config, extra_layers: int = 0,
                  prefix: str = "vision_model.") -> State:
    """Our tower's state -> the transformers tower's (``prefix`` before every name)."""
    v = config.vision
    clip = v.vision_model_type == "clip"
    state = {k: v_ for k, v_ in state.items() if not k.endswith("_extra_state")}
    used = set()

    def take(key: str) -> torch.Tensor:
        if key not in state:
            raise ExportError(f"our vision tower has no {key!r}")
        used.add(key)
        return state[key]

    emb = f"{prefix}embeddings."
    out = {f"{emb}patch_embedding.weight": take("conv1.weight"),
           f"{emb}position_embedding.weight": take("position_embeddings.weight")}
    if clip:
        out[f"{emb}class_embedding"] = take("class_token").reshape(-1)
        out[f"{prefix}pre_layrnorm.weight"] = take("ln_pre.weight")
        out[f"{prefix}pre_layrnorm.bias"] = take("ln_pre.bias")
    else:
        out[f"{emb}patch_embedding.bias"] = take("conv1.bias")
    heads = v.vision_num_attention_heads
    last = v.vision_num_layers - 1
    for i in range(v.vision_num_layers):
        src = f"decoder.layers.{i}."
        used.update(k for k in state if k.startswith(src))
        out.update(_layer(state, src, f"{prefix}encoder.layers.{i}.", heads))
    for j in range(extra_layers):
        out.update(_identity_layer(state, f"decoder.layers.{last}.",
                                   f"{prefix}encoder.layers.{last + 1 + j}."))
    h = v.vision_hidden_size
    dtype = out[f"{emb}position_embedding.weight"].dtype
    out[f"{prefix}post_layernorm.weight"] = torch.ones(h, dtype=dtype)
    out[f"{prefix}post_layernorm.bias"] = torch.zeros(h, dtype=dtype)
    leftovers = sorted(set(state) - used)
    if leftovers:
        raise ExportError(f"the vision exporter has no place for {leftovers[:4]}")
    return out


def select_strategy(config) -> str:
    """transformers' LLaVA strategy: 'default' drops the tower's first output (CLIP's class
    token, or SigLIP's first patch as MoE-LLaVA does), 'full' keeps everything."""
    from megatron_stgc.model.vision import leading_tokens_dropped

    return "default" if leading_tokens_dropped(config) == 1 else "full"


def extra_image_tokens(config) -> int:
    """Tower outputs that are not patches (LlavaProcessor's num_additional_image_tokens)."""
    return 1 if config.vision.vision_model_type == "clip" else 0
