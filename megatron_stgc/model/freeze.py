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
from megatron_stgc.model.llava import model_parts


def _moe_parameter_ids(language_model: torch.nn.Module) -> set[int]:
    return {id(p) for module in language_model.modules() if isinstance(module, BaseMoELayer)
            for p in module.parameters()}


def frozen_parameter_names(model: torch.nn.Module, config: RunConfig) -> list[str]:
    """Names of the parameters the freeze flags select (model: MoELLaVAModel or GPTModel)."""
    v = config.vision
    flags = {"vision_model": v.freeze_vit, "vision_projection": v.freeze_projection,
             "language_model": v.freeze_lm}
    parts = model_parts(model)
    frozen = {id(p) for part, module in parts.items() if flags[part] for p in module.parameters()}
    frozen -= _moe_parameter_ids(parts["language_model"])  # the MoE layers keep training
    return [name for name, param in model.named_parameters() if id(param) in frozen]


def apply_freezing(model: torch.nn.Module, config: RunConfig) -> list[str]:
    """Set requires_grad=False on the selected parameters; returns their names."""
    names = set(frozen_parameter_names(model, config))
    for name, param in model.named_parameters():
        if name in names:
            param.requires_grad_(False)
    return sorted(names)
