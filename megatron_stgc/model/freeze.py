"""--freeze-vit / --freeze-projection / --freeze-lm: which parameters stop training.

Frozen parameters get ``requires_grad = False`` before megatron-core's DDP and
optimizer are built, so they have no grad buffer and no optimizer state.
``--freeze-lm`` keeps the language model's MoE layers (routers and experts)
trainable: MoE-LLaVA's stage III trains only those.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_layer import BaseMoELayer

from megatron_stgc.config import RunConfig


def _moe_parameter_ids(language_model: torch.nn.Module) -> set[int]:
    return {id(p) for module in language_model.modules() if isinstance(module, BaseMoELayer)
            for p in module.parameters()}


def frozen_parameter_names(model: torch.nn.Module, config: RunConfig) -> list[str]:
    """Names of the parameters the freeze flags select (model: MoELLaVAModel or GPTModel)."""
    v = config.vision
    language_model = getattr(model, "language_model", model)
    keep_moe = _moe_parameter_ids(language_model)
    lm_ids = {id(p) for p in language_model.parameters()}
    vision_ids = {id(p) for p in getattr(model, "vision_model", torch.nn.Module()).parameters()}
    projection_ids = {id(p) for p in
                      getattr(model, "vision_projection", torch.nn.Module()).parameters()}
    names = []
    for name, param in model.named_parameters():
        key = id(param)
        if ((v.freeze_vit and key in vision_ids) or (v.freeze_projection and key in projection_ids)
                or (v.freeze_lm and key in lm_ids and key not in keep_moe)):
            names.append(name)
    return names


def apply_freezing(model: torch.nn.Module, config: RunConfig) -> list[str]:
    """Set requires_grad=False on the selected parameters; returns their names."""
    names = set(frozen_parameter_names(model, config))
    for name, param in model.named_parameters():
        if name in names:
            param.requires_grad_(False)
    return sorted(names)
