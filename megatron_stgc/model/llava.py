"""MoE-LLaVA: vision tower -> 2-layer GELU projector -> MoE GPT, from megatron-core parts.

Same parts and attribute names as megatron-core's ``LLaVAModel``
(``vision_model`` = CLIPViTModel, ``vision_projection`` = MultimodalProjector,
``language_model`` = GPTModel with MoE every ``--moe-layer-freq`` layers and
STGC on its MoE layers when ``--stgc``), composed here instead of using
``LLaVAModel`` because our data pipeline already expands ``<image>`` into
``num_image_tokens`` positions: combining is one masked scatter, and the
modality of every position is known before the language model runs (the MoE
routers need it for per-modality statistics).

Data flow of ``forward``::

    images [n_img, 3, H, W] --ViT--> [n_img, P(+1), vh] --drop cls--> [n_img, P', vh]
        (the first ``class_token_len`` outputs: CLIP's class token, or SigLIP's first patch
        as MoE-LLaVA drops it; ``model.vision.leading_tokens_dropped``)
        --projector--> [n_img, P', h]
    tokens [b, s] --word embeddings--> [s, b, h]; positions holding image_token_id
        get the n_img * P' image embeddings (row-major over [b, s])
    --> GPT decoder (MoE layers see the modality mask; megatron-core's padding_mask keeps
        padding out of its balancing losses) --> per-token loss [b, s]

Packed rows (``segment_ids``, --use-packed-sequence): attention is kept inside each sample by
a block-diagonal causal mask (local spec) or megatron-core's THD PackedSeqParams over the
flattened micro-batch (Transformer Engine spec); model/packing.py. The masked scatter stays
row-major either way, so the data side orders a micro-batch's images by (row, column).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_stgc.config import RunConfig
from megatron_stgc.ltdr.attached import attach_modality
from megatron_stgc.stgc.modality_filter import attach_modality as attach_stgc_modality
from megatron_stgc.model.modality import ModalityContext, modality_of
from megatron_stgc.model import packing


def projector_submodules(use_te: bool) -> MLPSubmodules:
    if use_te:
        from megatron.core.extensions.transformer_engine import (TEColumnParallelLinear,
                                                                 TERowParallelLinear)
        return MLPSubmodules(linear_fc1=TEColumnParallelLinear, linear_fc2=TERowParallelLinear)
    return MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)


def projector_config(language_config: TransformerConfig) -> TransformerConfig:
    """LLaVA-1.5's projector: Linear(vh -> h), GELU, Linear(h -> h), with biases, no MoE."""
    return dataclasses.replace(
        language_config, ffn_hidden_size=language_config.hidden_size, gated_linear_unit=False,
        activation_func=F.gelu, add_bias_linear=True, bias_activation_fusion=False,
        num_moe_experts=None, moe_layer_freq=1, moe_ffn_hidden_size=None,
        expert_model_parallel_size=1,
        recompute_granularity=None, recompute_method=None, recompute_num_layers=None)


class MoELLaVAModel(MegatronModule):
    """Vision tower + projector + MoE language model (one pipeline stage)."""

    def __init__(self, language_model: GPTModel, vision_model: torch.nn.Module,
                 vision_projection: MultimodalProjector, image_token_id: int,
                 drop_class_token: bool, class_token_len: int,
                 packed_attention: str = packing.MASK):
        super().__init__(config=language_model.config)
        self.packed_attention = packed_attention  # how packed rows keep samples apart
        self.language_model = language_model
        self.vision_model = vision_model
        self.vision_projection = vision_projection
        self.image_token_id = image_token_id
        self.drop_class_token = drop_class_token
        self.class_token_len = class_token_len
        self.modality = ModalityContext()
        self.ltdr_routers = attach_modality(language_model, self.modality)
        attach_stgc_modality(language_model, self.modality)  # --stgc-modalities
        self.model_type = ModelType.encoder_or_decoder  # what megatron-core's schedules look up

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """[n_img, 3, H, W] -> [n_img, P, h] in the language model's hidden size."""
        features = self.vision_model(images.to(self.vision_model.conv1.weight.dtype))
        if self.drop_class_token:
            features = features[:, self.class_token_len:, :]
        return self.vision_projection(features)

    def combined_embeddings(self, tokens: torch.Tensor, position_ids: torch.Tensor,
                            images: Optional[torch.Tensor]) -> torch.Tensor:
        """[s, b, h]: word (+position) embeddings with image embeddings at the image tokens."""
        text = self.language_model.embedding(input_ids=tokens, position_ids=position_ids)
        is_image = tokens == self.image_token_id  # [b, s]
        n_images = 0 if images is None else images.shape[0]
        if n_images == 0:
            _require_count(is_image, 0, "{} image-token positions but no images in the batch")
            return text
        features = self.image_embeddings(images)  # [n_img, P, h]
        _require_count(is_image, features.shape[0] * features.shape[1],
                       f"{{}} image-token positions for {n_images} images of "
                       f"{features.shape[1]} embeddings each")
        by_row = text.transpose(0, 1)  # [b, s, h]
        by_row = by_row.masked_scatter(is_image.unsqueeze(-1), features.to(by_row.dtype))
        return by_row.transpose(0, 1).contiguous()

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, images: Optional[torch.Tensor] = None,
                modality: Optional[torch.Tensor] = None,
                padding_mask: Optional[torch.Tensor] = None,
                segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-token loss [b, s] with ``labels``, else logits [b, s, vocab].

        padding_mask: bool [b, s], True = padding (megatron-core's sense): left out of the
        MoE balancing losses and of every statistic counted from the routers.
        segment_ids: int [b, s], the sample of each position in packed rows (-1 = padding);
        attention then stays inside a sample (``attention_mask`` must be None).
        """
        rows = tokens.shape
        packed_seq_params = None
        if segment_ids is not None:
            (tokens, position_ids, labels, modality, padding_mask), attention_mask, \
                packed_seq_params = packing.packed_inputs(
                    self.packed_attention, segment_ids, attention_mask,
                    (tokens, position_ids, labels, modality, padding_mask))
        decoder_input = self.combined_embeddings(tokens, position_ids, images)
        if modality is None and self.ltdr_routers:  # eval / generation: LTDR routes by it
            modality = modality_of(tokens, self.image_token_id, torch.full_like(
                tokens[:, 0], tokens.shape[1]))
        self.modality.set(modality)
        try:
            output = self.language_model(tokens, position_ids, attention_mask,
                                         decoder_input=decoder_input, labels=labels,
                                         packed_seq_params=packed_seq_params,
                                         padding_mask=padding_mask)
        finally:
            self.modality.set(None)
        return output.reshape(*rows, *output.shape[2:]) if packed_seq_params else output


def model_parts(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """{"vision_model", "vision_projection", "language_model"} of a MoELLaVAModel; a plain
    GPTModel is just {"language_model": model}."""
    if isinstance(model, MoELLaVAModel):
        return {"vision_model": model.vision_model, "vision_projection": model.vision_projection,
                "language_model": model.language_model}
    return {"language_model": model}


def build_llava_model(config: RunConfig, language_model: GPTModel,
                      image_token_id: int) -> MoELLaVAModel:
    """Wrap an already built MoE GPT with the vision tower and projector of ``config.vision``."""
    from megatron_stgc.model.gpt import use_transformer_engine
    from megatron_stgc.model.vision import build_vision_model, leading_tokens_dropped

    vision_model = build_vision_model(config)
    projection = MultimodalProjector(
        projector_config(language_model.config), projector_submodules(use_transformer_engine(config)),
        projector_type="mlp", input_size=config.vision.vision_hidden_size)
    dropped = leading_tokens_dropped(config)
    return MoELLaVAModel(language_model, vision_model, projection, image_token_id,
                         drop_class_token=dropped > 0, class_token_len=dropped,
                         packed_attention=packing.packed_attention_kind(
                             use_transformer_engine(config)))


def _require_count(mask: torch.Tensor, expected: int, message: str) -> None:
    """``mask.sum() == expected``. On the CPU a ValueError at once; on a GPU a device-side
    assertion (no host sync in the forward; a mismatch fails the next synchronising call).
    ``message`` has one ``{}`` for the count."""
    count = mask.sum()
    if mask.device.type == "cpu":
        if int(count) != expected:
            raise ValueError(message.format(int(count)))
        return
    torch._assert_async(count == expected, message.format("the wrong number of"))
