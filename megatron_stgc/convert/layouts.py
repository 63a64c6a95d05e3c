"""One model, two key layouts: megatron-core's local spec (CPU) and Transformer Engine spec (GPU).

A state dict written by a CPU run (or by the converters, which write the local layout)
must load into a GPU run's model and back. The layouts differ in where layer norms live
and how grouped-GEMM experts name their weights:

| local spec                                   | TE spec                                        |
| -------------------------------------------- | ---------------------------------------------- |
| layers.i.input_layernorm.{weight,bias}       | layers.i.self_attention.linear_qkv.layer_norm_{weight,bias} |
| layers.i.pre_mlp_layernorm.{weight,bias}     | layers.i.mlp.linear_fc1.layer_norm_{weight,bias} (dense layers; |
|                                              | MoE layers keep pre_mlp_layernorm)              |
| mlp.experts.local_experts.e.linear_fcK.weight | mlp.experts.linear_fcK.weight{e} (grouped GEMM)  |

``matching_layout(state, model_keys)`` renames ``state`` into whichever layout the model
uses, by trying each conversion and keeping the one whose keys are exactly the model's;
when none matches, the state is returned unchanged and the strict load names the
mismatching keys. Nothing is guessed: a partial match is never taken.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

import torch

State = dict[str, torch.Tensor]

_LAYER_NORM = re.compile(r"^(.*layers\.\d+\.)(input_layernorm|pre_mlp_layernorm)\.(weight|bias)$")
_FUSED_NORM = re.compile(
    r"^(.*layers\.\d+\.)(self_attention\.linear_qkv|mlp\.linear_fc1)\.layer_norm_(weight|bias)$")
_LOCAL_EXPERT = re.compile(r"^(.*\.mlp\.experts\.)local_experts\.(\d+)\.(linear_fc[12])\.(weight|bias)$")
_GROUPED_EXPERT = re.compile(r"^(.*\.mlp\.experts\.)(linear_fc[12])\.(weight|bias)(\d+)$")
_NORM_OWNER = {"input_layernorm": "self_attention.linear_qkv", "pre_mlp_layernorm": "mlp.linear_fc1"}
_OWNER_NORM = {owner: norm for norm, owner in _NORM_OWNER.items()}


def _is_moe_layer(state: Iterable[str], layer_prefix: str) -> bool:
    return any(key.startswith(layer_prefix + "mlp.router.") for key in state)


def to_te_layout(state: State, grouped_experts: bool = False) -> State:
    """Local-spec keys -> TE-spec keys (norms into the linears of dense layers; with
    ``grouped_experts`` the SequentialMLP experts become TEGroupedMLP weights)."""
    out = {}
    for key, value in state.items():
        norm = _LAYER_NORM.match(key)
        if norm and not (norm.group(2) == "pre_mlp_layernorm"
                         and _is_moe_layer(state, norm.group(1))):
            key = f"{norm.group(1)}{_NORM_OWNER[norm.group(2)]}.layer_norm_{norm.group(3)}"
        expert = _LOCAL_EXPERT.match(key) if grouped_experts else None
        if expert:
            key = f"{expert.group(1)}{expert.group(3)}.{expert.group(4)}{expert.group(2)}"
        out[key] = value
    return out


def to_local_layout(state: State) -> State:
    """TE-spec keys -> local-spec keys (the inverse of ``to_te_layout``, grouped experts too)."""
    out = {}
    for key, value in state.items():
        fused = _FUSED_NORM.match(key)
        if fused:
            key = f"{fused.group(1)}{_OWNER_NORM[fused.group(2)]}.{fused.group(3)}"
        expert = _GROUPED_EXPERT.match(key)
        if expert:
            key = (f"{expert.group(1)}local_experts.{expert.group(4)}.{expert.group(2)}."
                   f"{expert.group(3)}")
        out[key] = value
    return out


CONVERSIONS: dict[str, Callable[[State], State]] = {
    "as saved": lambda state: state,
    "local -> TE": to_te_layout,
    "local -> TE (grouped experts)": lambda state: to_te_layout(state, grouped_experts=True),
    "TE -> local": to_local_layout,
    "TE -> TE (grouped experts)": lambda state: to_te_layout(to_local_layout(state), True),
    "TE (grouped experts) -> TE": lambda state: to_te_layout(to_local_layout(state)),
}


def _real(keys: Iterable[str]) -> set[str]:
    return {key for key in keys if not key.endswith("_extra_state")}


def matching_layout(state: State, model_keys: Iterable[str]) -> tuple[State, str]:
    """``state`` renamed to the layout whose keys are exactly ``model_keys`` (extra_state
    aside), and the conversion's name; unchanged ("as saved") when none matches."""
    wanted = _real(model_keys)
    for name, convert in CONVERSIONS.items():
        converted = convert(state)
        if _real(converted) == wanted:
            return converted, name
    return state, "as saved"
