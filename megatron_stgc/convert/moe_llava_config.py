"""MoE-LLaVA's ``moe`` config section -> our MoE flags, and how its router compares to ours.

``config.json["moe"]`` (written by ``initialize_moe_modules``,
``moellava/model/language_model/llava_stablelm_moe.py:431-479``; read back by the Eval
classes, ``:517-532``): ``moe_enable``, ``moe_mode``, ``moe_layers_idx`` (the MoE layers;
``sparse`` = every other layer from 0, ``:468-469``), ``num_experts`` (one entry per MoE layer,
``:477-479``), ``top_k_experts``, ``capacity_factor``, ``eval_capacity_factor``,
``min_capacity``, ``use_residual``, ``router_aux_loss_coef``, ``ep_size``, ``train_modules``.
MoE-LLaVA's loader treats a checkpoint as MoE when ``moe.moe_enable`` is true
(``moellava/model/builder.py:192``).

Router semantics (DeepSpeed 0.9.5 ``sharded_moe.py``): logits = ``wg(x)`` in fp32 (:396-402);
top-2 (:277-340): p = softmax over all E logits, first expert argmax p, second argmax of
(logits + Gumbel noise) over the rest, weights p1 / (p1 + p2) and p2 / (p1 + p2). Ours
(megatron-core, ``--moe-router-pre-softmax`` false for top-2): top-2 of the logits, softmax over
those two: exp(z1) / (exp(z1) + exp(z2)) = p1 / (p1 + p2), the same weights for the same two
experts. The difference is which second expert: DeepSpeed 0.9.5 adds the Gumbel noise in
``top2gating`` unconditionally, in eval too (no ``self.training`` test on that path), so
MoE-LLaVA's second expert is a sample; ours is the deterministic second-best. Top-1
(:179-274, no noise policy set by MoE-LLaVA): weight = p of the argmax expert, not
renormalised; ours with top-1 needs ``--moe-router-pre-softmax`` (softmax, then top-1: the same
p). tests/test_convert_moe_llava.py checks both against a slow reference of that gating
without noise. Not the same either: DeepSpeed's aux loss uses the top-1 assignment only
(``ce = mean(mask1)``, l_aux = E * sum(me * ce), :306-309), megatron-core counts every top-k
assignment; capacity (MoE-LLaVA: ``capacity_factor`` 1.5 in training, ``eval_capacity_factor``
2.0, ``min_capacity`` 0; capacity = ceil(tokens / E * factor * k), first choices placed before
second ones) is not written by the converter: with E = 4, top-2 and factor 2.0 it is every
token (nothing drops), so converted models evaluate dropless as MoE-LLaVA's do.
"""

from __future__ import annotations

from megatron_stgc.convert import ConversionError


def is_moe(config: dict) -> bool:
    moe = config.get("moe")
    return isinstance(moe, dict) and bool(moe.get("moe_enable", False))


def moe_layers(config: dict, num_layers: int, what: str) -> list[int]:
    layers = config["moe"].get("moe_layers_idx")
    if (not isinstance(layers, list) or not layers
            or not all(isinstance(i, int) and 0 <= i < num_layers for i in layers)):
        raise ConversionError(f"{what}: config.json moe.moe_layers_idx {layers!r} is not a list "
                              f"of layer indices in [0, {num_layers})")
    return sorted(set(layers))


def moe_flags(config: dict, num_layers: int, what: str) -> dict:
    """Our flags for the MoE section of a MoE-LLaVA config.json."""
    moe = config["moe"]
    layers = moe_layers(config, num_layers, what)
    experts = moe.get("num_experts")
    if isinstance(experts, int):
        experts = [experts] * len(layers)
    if not isinstance(experts, list) or len(set(experts)) != 1 or len(experts) != len(layers):
        raise ConversionError(f"{what}: config.json moe.num_experts {experts!r}: one expert "
                              f"count shared by all {len(layers)} MoE layers is supported")
    top_k = moe.get("top_k_experts", 2)
    if top_k not in (1, 2):
        raise ConversionError(f"{what}: config.json moe.top_k_experts {top_k!r} (MoE-LLaVA "
                              "allows 1 or 2)")
    if moe.get("use_residual", False):
        raise ConversionError(f"{what}: config.json moe.use_residual true (DeepSpeed's residual "
                              "MoE: a dense FFN beside the experts) has no counterpart here")
    return {
        "num_experts": experts[0],
        "moe_router_topk": top_k,
        "moe_router_pre_softmax": top_k == 1,  # the weights MoE-LLaVA computes (docstring)
        "moe_aux_loss_coeff": float(moe.get("router_aux_loss_coef", 0.01)),
        **placement_flags(layers, num_layers),
    }


def placement_flags(layers: list[int], num_layers: int) -> dict:
    """``--moe-layer-freq N`` when the MoE layers are every N-th from 0 (MoE-LLaVA's ``sparse``:
    2, ``dense``: 1), else ``--moe-layer-pattern``."""
    for freq in range(1, num_layers + 1):
        if layers == [i for i in range(num_layers) if i % freq == 0]:
            return {"moe_layer_freq": freq, "moe_layer_pattern": None}
    pattern = ",".join("1" if i in layers else "0" for i in range(num_layers))
    return {"moe_layer_freq": 1, "moe_layer_pattern": pattern}


def training_notes(config: dict) -> str:
    """MoE-LLaVA's training-time MoE settings that the converter does not turn into flags."""
    moe = config["moe"]
    return (f"MoE-LLaVA trained with capacity_factor {moe.get('capacity_factor')}, "
            f"eval_capacity_factor {moe.get('eval_capacity_factor')}, min_capacity "
            f"{moe.get('min_capacity')}, ep_size {moe.get('ep_size')}; the converted flags are "
            "dropless (set capacity flags for stage III yourself)")
