"""Which module group a parameter of our models belongs to, by its name.

The groups are the ones a stage-III recipe talks about (MoE-LLaVA trains the language
model's FFNs and routers and freezes the rest): ``vision`` (the ViT), ``projector``,
``embeddings`` (word / position embeddings and the output layer), ``attention``, ``norms``,
``dense-ffn`` (the MLP of a dense decoder layer), ``experts`` (routed and shared experts of a
MoE layer), ``routers``; ``other`` for anything these rules do not place.

Names are ours (``MoELLaVAModel.named_parameters()``; a text-only GPTModel has no
``language_model.`` prefix). Both megatron-core layer specs are covered: the local spec
keeps its norms as modules (``input_layernorm``, ``pre_mlp_layernorm``, ``final_layernorm``,
``q_layernorm``), the Transformer Engine spec fuses them into the next linear
(``linear_qkv.layer_norm_weight``, ``mlp.linear_fc1.layer_norm_bias``): those are norms,
not attention or FFN weights.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

GROUPS = ("vision", "projector", "embeddings", "attention", "norms", "dense-ffn", "experts",
          "routers", "other")


def _is_norm(parts: list[str]) -> bool:
    return "layer_norm" in parts[-1] or any(part.endswith("layernorm") for part in parts)


def parameter_group(name: str) -> str:
    """The group of parameter ``name`` (one of GROUPS)."""
    if name.startswith("vision_model."):
        return "vision"
    if name.startswith("vision_projection."):
        return "projector"
    parts = name.removeprefix("language_model.").split(".")
    if _is_norm(parts):
        return "norms"
    if parts[0] in ("embedding", "output_layer"):
        return "embeddings"
    if "self_attention" in parts:
        return "attention"
    if "mlp" in parts:
        after_mlp = parts[parts.index("mlp") + 1]
        if after_mlp == "router":
            return "routers"
        if after_mlp in ("experts", "shared_experts"):
            return "experts"
        return "dense-ffn"
    return "other"


def group_counts(model: torch.nn.Module) -> "OrderedDict[str, tuple[int, int]]":
    """{group: (trainable elements, all elements)} for the groups the model has."""
    counts: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        total = counts.setdefault(parameter_group(name), [0, 0])
        total[0] += param.numel() if param.requires_grad else 0
        total[1] += param.numel()
    return OrderedDict((group, tuple(counts[group])) for group in GROUPS if group in counts)


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f}M" if count >= 10_000 else str(count)


def describe_trainable(model: torch.nn.Module) -> str:
    """One log line: trainable / all parameters per group, and the totals (this rank's
    parameters: with expert parallelism, the experts this rank holds)."""
    counts = group_counts(model)
    trainable = sum(t for t, _ in counts.values())
    total = sum(a for _, a in counts.values())
    groups = ", ".join(f"{group} {_millions(t)}/{_millions(a)}" for group, (t, a) in counts.items())
    return (f"trainable parameters (this rank): {_millions(trainable)} of {_millions(total)}; "
            f"by group (trainable/all): {groups}")
