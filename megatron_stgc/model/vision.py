"""The vision tower of a LLaVA-style model: megatron-core's CLIPViTModel from ``config.vision``.

* ``vision_transformer_config`` is the ViT's TransformerConfig (dense, no MoE):
  CLIP = LayerNorm (eps 1e-5), quick-GELU MLP, biases on every linear;
  SigLIP = LayerNorm (eps 1e-6), tanh-approximated GELU MLP, biases everywhere.
* ``vit_layer_spec`` is a pre-norm transformer layer with BIDIRECTIONAL
  attention (``AttnMaskType.no_mask``): every patch attends to every patch.
  megatron-core 0.16's ``get_vit_layer_with_local_spec`` uses a causal mask,
  which is not what CLIP/SigLIP compute, so the local spec is built here from
  the same megatron-core modules. With Transformer Engine megatron-core's own
  TE ViT spec is used (it already has ``no_mask``).
* ``build_vision_model`` builds the CLIPViTModel: conv patch embedding,
  class token (CLIP only), learned position embeddings, ``ln_pre`` (CLIP only),
  then ``vision_num_layers`` layers and NO final norm, for both towers: the output
  is the hidden state after ``vision_num_layers`` layers, the tensor LLaVA / MoE-LLaVA
  select (``hidden_states[mm_vision_select_layer]``; the converters keep all layers but
  the last for ``-2``). megatron-core's siglip subtype would apply ``ln_post`` after the
  last layer (SigLIP's ``post_layernorm``, which MoE-LLaVA does not use): it is built
  as ``torch.nn.Identity`` here. Output [n_img, P(+1), vision_hidden_size].
* ``num_image_tokens`` is how many language-model positions one image takes;
  ``leading_tokens_dropped`` how many of the tower's first outputs the LLaVA model drops
  (CLIP's class token with ``--disable-vision-class-token``; SigLIP's first patch with
  ``--vision-drop-first-patch``, as MoE-LLaVA's siglip_encoder.py:34-35 does).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core.activations import quick_gelu
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.vision.clip_vit_model import CLIPViTModel
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_stgc.config import RunConfig, fill_defaults
from megatron_stgc.model.gpt import Hardware, this_machine, use_transformer_engine

CLASS_TOKEN_LEN = 1  # CLIP prepends one class token; SigLIP has none
# activation and LayerNorm epsilon of each vision tower (HF CLIP: quick_gelu, 1e-5;
# HF SigLIP: gelu_pytorch_tanh, 1e-6)
_TOWERS = {
    "clip": (quick_gelu, 1e-5),
    "siglip": (functools.partial(F.gelu, approximate="tanh"), 1e-6),
}


def vision_transformer_config(config: RunConfig, hardware: Hardware | None = None
                              ) -> TransformerConfig:
    """The ViT's TransformerConfig: dense, biases everywhere, fp32 or bf16 like the LM.

    hardware: what the flags are chosen for (default: this machine)."""
    return TransformerConfig(**vision_transformer_config_kwargs(config, hardware))


def vision_transformer_config_kwargs(config: RunConfig, hardware: Hardware | None = None) -> dict:
    fill_defaults(config)
    hardware = hardware or this_machine()
    v, pr = config.vision, config.precision
    if v.vision_model_type not in _TOWERS:
        raise ValueError(f"--vision-model-type must be one of {sorted(_TOWERS)}, "
                         f"got {v.vision_model_type!r}")
    activation, eps = _TOWERS[v.vision_model_type]
    on_gpu = hardware.cuda
    fused = on_gpu and use_transformer_engine(config, hardware)
    params_dtype = torch.bfloat16 if pr.bf16 else torch.float32
    return dict(
        num_layers=v.vision_num_layers,
        hidden_size=v.vision_hidden_size,
        ffn_hidden_size=v.vision_ffn_hidden_size,
        num_attention_heads=v.vision_num_attention_heads,
        add_bias_linear=True,
        add_qkv_bias=True,
        gated_linear_unit=False,
        activation_func=activation,
        normalization="LayerNorm",
        layernorm_epsilon=eps,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=config.model.init_method_std,
        tensor_model_parallel_size=config.parallel.tensor_model_parallel_size,
        num_moe_experts=None,
        bf16=pr.bf16,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        autocast_dtype=params_dtype,
        use_cpu_initialization=not on_gpu,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,  # megatron fuses only gelu/silu; quick_gelu is not one
        bias_dropout_fusion=fused,
        masked_softmax_fusion=fused,
        persist_layer_norm=False,
    )


def vit_layer_spec(use_te: bool = False) -> ModuleSpec:
    """Pre-norm ViT layer with bidirectional attention (local modules, or TE's ViT spec)."""
    if use_te:
        from megatron.core.models.vision.vit_layer_specs import (
            get_vit_layer_with_transformer_engine_spec)

        return get_vit_layer_with_transformer_engine_spec()
    norm = LocalSpecProvider().layer_norm(rms_norm=False, for_qk=False)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=DotProductAttention,
                    linear_proj=RowParallelLinear,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(
                linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def _norm_impl(use_te: bool) -> type:
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return LocalSpecProvider().layer_norm(rms_norm=False, for_qk=False)


def build_vision_model(config: RunConfig) -> CLIPViTModel:
    """megatron-core CLIPViTModel for ``config.vision`` (after parallel state exists).

    images [n, 3, img_h, img_w] -> [n, num_patches (+1 class token for CLIP), vision_hidden_size]
    """
    v = config.vision
    use_te = use_transformer_engine(config)
    clip = v.vision_model_type == "clip"
    return CLIPViTModel(
        vision_transformer_config(config),
        vit_layer_spec(use_te),
        ln_pre_impl=_norm_impl(use_te),
        ln_post_impl=torch.nn.Identity,  # no final norm (see the module docstring)
        add_class_token=clip,
        class_token_len=CLASS_TOKEN_LEN if clip else 0,
        patch_dim=v.patch_dim,
        img_h=v.img_h,
        img_w=v.img_w,
        model_subtype=v.vision_model_type,
    )


def leading_tokens_dropped(config: RunConfig) -> int:
    """How many of the tower's first output tokens the LLaVA model drops before the projector:
    CLIP's class token (--disable-vision-class-token), SigLIP's first patch
    (--vision-drop-first-patch, MoE-LLaVA's 'patch' selection)."""
    v = config.vision
    if v.vision_model_type == "clip":
        return CLASS_TOKEN_LEN if v.disable_vision_class_token else 0
    return 1 if v.vision_drop_first_patch else 0


def num_image_tokens(config: RunConfig) -> int:
    """Language-model positions per image: the tower's outputs (patches, plus CLIP's class
    token) less the leading ones dropped."""
    v = config.vision
    patches = (v.img_h // v.patch_dim) * (v.img_w // v.patch_dim)
    outputs = patches + (CLASS_TOKEN_LEN if v.vision_model_type == "clip" else 0)
    return outputs - leading_tokens_dropped(config)
