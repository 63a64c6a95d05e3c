"""MoE-LLaVA's MoE parameter names <-> our MoE GPTModel's, as one two-way table.

MoE-LLaVA's stage III (``moellava/model/language_model/llava_stablelm_moe.py:481-493``, the
same in ``llava_phi_moe.py`` and ``llava_qwen_moe.py``) replaces the FFN of each layer in
``config.moe['moe_layers_idx']`` by DeepSpeed's ``MoE(hidden_size, expert=<that FFN>, ...)``.
DeepSpeed 0.9.5 (MoE-LLaVA's pin, ``pyproject.toml``) names its parts
``deepspeed_moe`` (``deepspeed/moe/layer.py:70``) = ``MOELayer(gate=TopKGate, experts=Experts)``,
the router ``gate.wg`` = ``Linear(hidden, num_experts, bias=False)``
(``sharded_moe.py:376``) and the experts ``experts.deepspeed_experts.<e>`` = deep copies of the
dense FFN (``experts.py:15``). With ``ep_size`` 1 (MoE-LLaVA's default) every expert is saved
under its global index. So, with ``<layer>`` = ``model.layers.<i>`` (StableLM, Phi) or
``transformer.h.<i>`` (Qwen-1) and ``<leaf>`` = the family's FFN names (``gate_proj.weight``, ...)::

    <layer>.mlp.deepspeed_moe.gate.wg.weight [E, h]               router of layer i
    <layer>.mlp.deepspeed_moe.experts.deepspeed_experts.<e>.<leaf>  expert e's copy of the FFN

and ours (megatron-core local spec)::

    decoder.layers.<i>.mlp.router.weight [E, h]
    decoder.layers.<i>.mlp.experts.local_experts.<e>.<linear_fc1|linear_fc2>.<weight|bias>

``RULES`` pairs the two wrapper segments. The FFN leaves differ by family and are not a
renaming (StableLM's gate_proj and up_proj fuse into one linear_fc1), so the conversion goes
through "expert views": view e is the dense model with expert e's FFN in every MoE layer.

    to_ours:       MoE-LLaVA state --split (RULES)--> views --dense converter--> our dense
                   views --join (RULES)--> our MoE state
    to_moe_llava:  our MoE state --split (RULES)--> our dense views --dense exporter-->
                   HF views --join (RULES)--> MoE-LLaVA state

The split / join functions are pure and exact inverses (tests/test_convert_moe_llava.py);
the dense converter is the family's (``convert_stablelm``...), the dense exporter is left to
the issue that exports our models back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from megatron_stgc.convert import ConversionError

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class NamePair:
    """The segment after ``<layer>.mlp.`` in MoE-LLaVA's names and in ours; ``{e}`` = expert."""

    moe_llava: str
    ours: str


ROUTER = NamePair(moe_llava="deepspeed_moe.gate.wg.weight", ours="router.weight")
EXPERT = NamePair(moe_llava="deepspeed_moe.experts.deepspeed_experts.{e}.",
                  ours="experts.local_experts.{e}.")
RULES = (ROUTER, EXPERT)
OUR_LAYER = "decoder.layers.{i}"  # the local-spec GPTModel's layer prefix


def _pattern(segment: str) -> re.Pattern:
    """A regex for ``<layer>.mlp.<segment><leaf>``: groups layer (ending in .<i>), i, e, leaf."""
    body = re.escape(segment).replace(re.escape("{e}"), r"(?P<e>\d+)")
    return re.compile(rf"^(?P<layer>.*\.(?P<i>\d+))\.mlp\.{body}(?P<leaf>.*)$")


@dataclass
class ExpertViews:
    """A MoE state cut into dense models: ``shared`` (everything outside the MoE layers' FFNs),
    ``experts[e]`` (expert e's FFN tensors under the dense FFN's names), ``routers[i]``.

    ``layer_prefix`` maps a layer index to the layer prefix of these names
    (``model.layers.{i}``)."""

    shared: State
    experts: dict[int, State]
    routers: dict[int, torch.Tensor]
    layer_prefix: str
    moe_layers: list[int] = field(default_factory=list)

    def view(self, expert: int) -> State:
        """The dense model whose MoE-layer FFNs are expert ``expert``'s (tensors shared)."""
        return {**self.shared, **self.experts[expert]}


def split(state: State, side: str) -> ExpertViews:
    """``side`` "moe_llava" or "ours": cut a MoE state dict into expert views (pure)."""
    router = _pattern(getattr(ROUTER, side))
    expert = _pattern(getattr(EXPERT, side))
    shared, experts, routers, prefixes = {}, {}, {}, set()
    for key, value in state.items():
        found = router.match(key)
        if found:
            routers[int(found["i"])] = value
            prefixes.add(_prefix_template(found["layer"], found["i"]))
            continue
        found = expert.match(key)
        if found:
            dense_key = f"{found['layer']}.mlp.{found['leaf']}"
            experts.setdefault(int(found["e"]), {})[dense_key] = value
            prefixes.add(_prefix_template(found["layer"], found["i"]))
            continue
        shared[key] = value
    if len(prefixes) > 1:
        raise ConversionError(f"MoE layers under more than one layer prefix: {sorted(prefixes)}")
    views = ExpertViews(shared, dict(sorted(experts.items())), dict(sorted(routers.items())),
                        prefixes.pop() if prefixes else "", sorted(routers))
    _check_complete(views, side)
    return views


def join(views: ExpertViews, side: str) -> State:
    """The inverse of ``split``: expert views -> one MoE state dict with ``side``'s names."""
    router, expert = getattr(ROUTER, side), getattr(EXPERT, side)
    state = dict(views.shared)
    for i, weight in views.routers.items():
        state[f"{views.layer_prefix.format(i=i)}.mlp.{router}"] = weight
    for e, tensors in views.experts.items():
        for dense_key, value in tensors.items():
            layer, leaf = _split_dense_key(dense_key)
            state[f"{layer}.mlp.{expert.format(e=e)}{leaf}"] = value
    return state


def to_ours(moe_llava_state: State, convert_dense: Callable[[State], State]) -> State:
    """MoE-LLaVA MoE state (LM keys only) -> our MoE GPTModel state.

    ``convert_dense(hf_dense_state) -> our dense state``: the language family's converter."""
    views = split(moe_llava_state, "moe_llava")
    ours = ExpertViews(shared={}, experts={}, routers=views.routers, layer_prefix=OUR_LAYER,
                       moe_layers=views.moe_layers)
    for e in views.experts:
        dense = convert_dense(views.view(e))
        moe_ffn = {key: value for key, value in dense.items()
                   if _layer_of(key) in views.moe_layers and ".mlp." in key}
        ours.experts[e] = moe_ffn
        if not ours.shared:  # every view has the same tensors outside the MoE FFNs
            ours.shared = {key: value for key, value in dense.items() if key not in moe_ffn}
    if not views.experts:  # a dense model: nothing to split
        return convert_dense(views.shared)
    return join(ours, "ours")


def to_moe_llava(our_state: State, export_dense: Callable[[State], State],
                 layer_prefix: str = "model.layers.{i}") -> State:
    """The inverse of ``to_ours``, given the family's dense exporter (ours -> HF names)."""
    views = split(our_state, "ours")
    theirs = ExpertViews(shared={}, experts={}, routers=views.routers, layer_prefix=layer_prefix,
                         moe_layers=views.moe_layers)
    for e in views.experts:
        dense = export_dense(views.view(e))
        moe_ffn = {key: value for key, value in dense.items()
                   if _layer_of(key) in views.moe_layers and ".mlp." in key}
        theirs.experts[e] = moe_ffn
        if not theirs.shared:
            theirs.shared = {key: value for key, value in dense.items() if key not in moe_ffn}
    return join(theirs, "moe_llava")


def _prefix_template(layer: str, index: str) -> str:
    return layer[: -len(index)] + "{i}"


def _split_dense_key(dense_key: str) -> tuple[str, str]:
    layer, _, leaf = dense_key.partition(".mlp.")
    return layer, leaf


def _layer_of(key: str) -> int | None:
    found = re.match(r"^.*?\.(\d+)\.mlp\.", key)
    return int(found.group(1)) if found else None


def _check_complete(views: ExpertViews, side: str) -> None:
    """Every MoE layer has a router and the same FFN tensors for every expert."""
    if not views.experts and not views.routers:
        return
    expert_layers = {_layer_of(k) for tensors in views.experts.values() for k in tensors}
    if expert_layers != set(views.routers):
        raise ConversionError(f"{side} MoE names: layers with experts {sorted(expert_layers)} "
                              f"differ from layers with a router {sorted(views.routers)}")
    names = {e: sorted(tensors) for e, tensors in views.experts.items()}
    first = next(iter(names.values()))
    for e, keys in names.items():
        if keys != first:
            missing = sorted(set(first) - set(keys)) or sorted(set(keys) - set(first))
            raise ConversionError(f"{side} MoE names: expert {e} does not have the same FFN "
                                  f"tensors as expert {next(iter(names))} (e.g. {missing[0]!r})")
