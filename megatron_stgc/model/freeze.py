"""Which parameters train: --trainable-modules and --freeze-vit / --freeze-projection /
--freeze-lm-except-moe / --freeze-language-model.

Frozen parameters get ``requires_grad = False`` before megatron-core's DDP and optimizer are
built, so they have no grad buffer and no optimizer state.

* ``--freeze-vit`` freezes the vision tower, ``--freeze-projection`` the projector,
  ``--freeze-language-model`` (Megatron-LM's ``--freeze-LM``) the whole language model,
  ``--freeze-lm-except-moe`` (formerly ``--freeze-lm``) the language model except its MoE
  layers (routers and experts); dense
  FFNs are frozen by it. (That is not MoE-LLaVA's stage III, which also trains every dense
  FFN and the projector: ``--trainable-modules moe-llava-stage3``, see model/trainable.py.)
* ``--trainable-modules`` selects what trains; everything it does not select is frozen.
* Both given: a parameter trains when the selection selects it and no freeze flag freezes
  it (the flags subtract from the selection). An entry written on the command line that
  is left with nothing to train by a freeze flag is a contradiction and an error naming
  both (a preset's members are exempt: ``moe-llava-stage3 --freeze-projection`` is the
  preset without the projector). Nothing left to train at all is an error too.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_layer import BaseMoELayer

from megatron_stgc.config import RunConfig
from megatron_stgc.model.llava import model_parts
from megatron_stgc.model.trainable import (TrainableSelectionError, parse_trainable_modules,
                                           selected_parameter_names)

def _freeze_flags(config: RunConfig) -> list[tuple[str, str, bool]]:
    """(model part, flag, whether its MoE layers keep training) for each freeze flag set."""
    v = config.vision
    return [(part, flag, keep_moe) for part, flag, on, keep_moe in (
        ("vision_model", "--freeze-vit", v.freeze_vit, False),
        ("vision_projection", "--freeze-projection", v.freeze_projection, False),
        ("language_model", "--freeze-lm-except-moe", v.freeze_lm_except_moe, True),
        ("language_model", "--freeze-language-model", v.freeze_language_model, False)) if on]


def _moe_parameter_ids(language_model: torch.nn.Module) -> set[int]:
    return {id(p) for module in language_model.modules() if isinstance(module, BaseMoELayer)
            for p in module.parameters()}


def flag_frozen_names(model: torch.nn.Module, config: RunConfig) -> dict[str, set[str]]:
    """{freeze flag: names of the parameters it freezes} for the flags that are set."""
    ids_to_names = {id(p): n for n, p in model.named_parameters()}
    parts = model_parts(model)
    frozen: dict[str, set[str]] = {}
    for part, flag, keep_moe in _freeze_flags(config):
        if part not in parts:
            continue
        ids = {id(p) for p in parts[part].parameters()}
        if keep_moe:
            ids -= _moe_parameter_ids(parts[part])
        frozen[flag] = {ids_to_names[i] for i in ids if i in ids_to_names}
    return frozen


def frozen_parameter_names(model: torch.nn.Module, config: RunConfig) -> list[str]:
    """Names of the parameters that must not train (model: MoELLaVAModel or GPTModel)."""
    by_flag = flag_frozen_names(model, config)
    frozen = set().union(*by_flag.values()) if by_flag else set()
    all_names = [name for name, _ in model.named_parameters()]
    value = config.vision.trainable_modules
    if value is not None:
        selected = _checked_selection(model, value, by_flag)
        frozen |= set(all_names) - selected
    if frozen and len(frozen) == len(all_names):
        raise TrainableSelectionError(
            "no parameter trains: " + _selection_summary(value, by_flag))
    return [name for name in all_names if name in frozen]


def _checked_selection(model, value: str, by_flag: dict[str, set[str]]) -> set[str]:
    """Union of what the entries select; errors for entries that select nothing or whose
    whole selection a freeze flag freezes."""
    selected: set[str] = set()
    for entry, names in selected_parameter_names(model, parse_trainable_modules(value)).items():
        selected |= names
        if entry.from_preset is not None:
            continue
        if not names:
            examples = [n for n, _ in model.named_parameters()][:6]
            raise TrainableSelectionError(
                f"--trainable-modules: {entry.describe()} selects no parameter of this model "
                f"(parameter names look like {examples})")
        for flag, frozen in by_flag.items():
            if names <= frozen:
                raise TrainableSelectionError(
                    f"--trainable-modules {entry.describe()} contradicts {flag}: every "
                    f"parameter it selects ({len(names)}) is frozen by {flag}")
    return selected


def _selection_summary(value, by_flag) -> str:
    flags = " ".join(sorted(by_flag)) or "no freeze flag"
    return f"--trainable-modules {value!r} with {flags}" if value else flags


def apply_freezing(model: torch.nn.Module, config: RunConfig) -> list[str]:
    """Set requires_grad=False on the selected parameters; returns their names."""
    names = set(frozen_parameter_names(model, config))
    for name, param in model.named_parameters():
        if name in names:
            param.requires_grad_(False)
    return sorted(names)
