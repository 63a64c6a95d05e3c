"""transformers SiglipVisionModel -> megatron-core CLIPViTModel, subtype "siglip" (TP=1).

MoE-LLaVA's SigLIP tower (``moellava/model/multimodal_encoder/siglip_encoder.py``):
``SiglipVisionModel(images, output_hidden_states=True).hidden_states[mm_vision_select_layer]``
(line 33; the released models and scripts use ``-2``), then, for the default
``mm_vision_select_feature 'patch'``, ``[:, 1:]`` (lines 34-35): the CLIP rule applied to a
tower WITHOUT a class token, so it drops the first PATCH. Neither ``post_layernorm`` nor the
attention-pooling ``head`` is used. At 384 px and patch 14 the tower has 27 x 27 = 729 patch
tokens and MoE-LLaVA feeds 728 to its projector.

Here: ``num_layers`` = the layers up to the selected hidden state (default
``num_hidden_layers - 1``, i.e. ``hidden_states[-2]``); ``model/vision.py`` builds the siglip
CLIPViTModel with no final norm (megatron-core's siglip subtype would apply ``ln_post``);
``--vision-drop-first-patch`` (written as true) drops the first patch in the LLaVA model.

Key mapping (HF prefix ``vision_model.`` or none, found automatically)::

    embeddings.patch_embedding.{weight [h, 3, p, p], bias}  -> conv1.{weight, bias}
    embeddings.position_embedding.weight [P, h]             -> position_embeddings.weight
    encoder.layers.i.*                                      -> decoder.layers.i.* (as CLIP:
                                                               hf_clip.encoder_layer)
    post_layernorm, head.*                                  -> not converted (unused)

megatron-core's CLIPViTModel needs ``img_h`` to be a multiple of ``patch_dim``; SigLIP's conv
(stride = kernel = patch, no padding) ignores the right / bottom remainder, so a 384 px
so400m tower is built with ``img_h = 378`` (27 whole patches): the same 729 position
embeddings, and the same output for the top-left 378 x 378 pixels of a 384 x 384 image.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from megatron_stgc.convert import ConversionError, find_prefix, take
from megatron_stgc.convert.hf_clip import encoder_layer

WHAT = "SigLIP vision model"
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")  # transformers' tanh GELUs


def _vision_config(hf_config):
    """A SiglipVisionConfig from a SiglipVisionConfig, SiglipConfig or LLaVA config."""
    config = getattr(hf_config, "vision_config", None) or hf_config
    model_type = getattr(config, "model_type", None)
    if model_type != "siglip_vision_model":
        raise ConversionError(f"{WHAT}: expected a SigLIP vision config (model_type "
                              f"'siglip_vision_model'), got model_type {model_type!r}")
    return config


def default_num_layers(hf_config) -> int:
    """MoE-LLaVA's choice (mm_vision_select_layer -2): all layers but the last."""
    return _vision_config(hf_config).num_hidden_layers - 1


def _check_supported(c, num_layers: int) -> None:
    problems = []
    if c.hidden_act not in _GELU_TANH:
        problems.append(f"hidden_act {c.hidden_act!r} (only the tanh GELU, "
                        "'gelu_pytorch_tanh')")
    if abs(c.layer_norm_eps - 1e-6) > 1e-12:
        problems.append(f"layer_norm_eps {c.layer_norm_eps} (only 1e-6)")
    if getattr(c, "num_channels", 3) != 3:
        problems.append(f"num_channels {c.num_channels} (only 3)")
    if c.image_size < c.patch_size:
        problems.append(f"image_size {c.image_size} smaller than patch_size {c.patch_size}")
    if not 1 <= num_layers <= c.num_hidden_layers:
        problems.append(f"num_layers {num_layers} outside [1, {c.num_hidden_layers}]")
    if problems:
        raise ConversionError(f"{WHAT}: unsupported configuration: {'; '.join(problems)}")


def siglip_vision_flags(hf_config, num_layers: Optional[int] = None) -> dict:
    """Our flag names -> values for a ViT equal to ``hf_config``'s first ``num_layers`` layers."""
    c = _vision_config(hf_config)
    num_layers = default_num_layers(c) if num_layers is None else num_layers
    _check_supported(c, num_layers)
    whole = (c.image_size // c.patch_size) * c.patch_size  # the pixels the conv reads
    return {
        "vision_model_type": "siglip",
        "vision_num_layers": num_layers,
        "vision_hidden_size": c.hidden_size,
        "vision_ffn_hidden_size": c.intermediate_size,
        "vision_num_attention_heads": c.num_attention_heads,
        "img_h": whole,
        "img_w": whole,
        "patch_dim": c.patch_size,
        "disable_vision_class_token": True,  # SigLIP has none (megatron-core requires true)
        "vision_drop_first_patch": True,  # MoE-LLaVA's 'patch' selection
    }


def convert_siglip_vision(hf_state_dict: dict, hf_config,
                          num_layers: Optional[int] = None) -> dict[str, torch.Tensor]:
    """HF SigLIP vision weights -> CLIPViTModel (siglip) state dict (no ``_extra_state``)."""
    c = _vision_config(hf_config)
    num_layers = default_num_layers(c) if num_layers is None else num_layers
    _check_supported(c, num_layers)
    hf = hf_state_dict
    pre = find_prefix(hf, "embeddings.patch_embedding.weight", WHAT)
    out = {
        "conv1.weight": take(hf, f"{pre}embeddings.patch_embedding.weight", WHAT),  # [h, 3, p, p]
        "conv1.bias": take(hf, f"{pre}embeddings.patch_embedding.bias", WHAT),
        "position_embeddings.weight": take(hf, f"{pre}embeddings.position_embedding.weight", WHAT),
    }
    for i in range(num_layers):
        out.update(encoder_layer(hf, f"{pre}encoder.layers.{i}.", f"decoder.layers.{i}.",
                                 c.num_attention_heads, WHAT))
    return {key: value.detach().clone() for key, value in out.items()}


def load_hf_siglip_vision(directory: str, log: Callable[[str], None] = print):
    """(state dict, vision config) of a SiglipVisionModel / SiglipModel directory."""
    from transformers import SiglipVisionModel

    log(f"loading the SigLIP vision tower from {directory}")
    model = SiglipVisionModel.from_pretrained(directory)
    return model.state_dict(), model.config
