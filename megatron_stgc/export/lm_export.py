"""Our dense GPTModel state (local spec, TP 1, whole tensors) -> a transformers causal LM's names.

The inverse of the importers (the key tables are in convert/hf_qwen2.py, hf_stablelm.py and
hf_phi.py; ``h`` = hidden, ``d`` = h / heads)::

    embedding.word_embeddings.weight [V', h]     -> model.embed_tokens.weight (all V' rows)
    decoder.layers.i.input_layernorm.*           -> model.layers.i.input_layernorm.*
    decoder.layers.i.self_attention.linear_qkv   -> model.layers.i.self_attn.{q,k,v}_proj
                                                    (unfuse_qkv: per K/V group q.. k v)
    decoder.layers.i.self_attention.linear_proj  -> model.layers.i.self_attn.o_proj (Phi: dense)
    decoder.layers.i.pre_mlp_layernorm.*         -> model.layers.i.post_attention_layernorm.*
                                                    (Phi's parallel block has none)
    decoder.layers.i.mlp.linear_fc1 [2f, h]      -> mlp.gate_proj = rows :f, mlp.up_proj = f:
                                                    (SwiGLU; Phi: mlp.fc1)
    decoder.layers.i.mlp.linear_fc2              -> mlp.down_proj (Phi: mlp.fc2)
    decoder.final_layernorm.*                    -> model.norm.* (Phi: model.final_layernorm.*)
    output_layer.weight / .bias                  -> lm_head.weight / .bias (untied models)

Qwen2's attention always has q/k/v biases (transformers' ``Qwen2Attention``): a model without
``--add-qkv-bias`` gets zero biases, which compute the same. Every tensor of our state must be
used: a leftover is an ExportError naming it (never a silent drop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

State = dict[str, torch.Tensor]


class ExportError(ValueError):
    """The model cannot be written in the requested format, or the written files are wrong."""


@dataclass(frozen=True)
class LMShape:
    """What the name maps need to know about our language model."""

    num_layers: int
    hidden: int
    heads: int
    groups: int  # K/V heads
    tied: bool

    @classmethod
    def of(cls, config) -> "LMShape":
        m = config.model
        return cls(m.num_layers, m.hidden_size, m.num_attention_heads,
                   m.num_query_groups or m.num_attention_heads,
                   not m.untie_embeddings_and_output_weights)


@dataclass(frozen=True)
class FamilyNames:
    """Where a transformers family keeps the parts our layer has."""

    out_proj: str  # "self_attn.o_proj" / "self_attn.dense"
    final_norm: str  # "model.norm" / "model.final_layernorm"
    post_norm: Optional[str]  # "post_attention_layernorm"; None for Phi's parallel block
    gated_mlp: bool  # gate_proj/up_proj/down_proj (SwiGLU) or fc1/fc2
    qkv_bias_required: bool  # the HF class always has q/k/v biases (Qwen2)


FAMILY_NAMES = {
    "qwen2": FamilyNames("self_attn.o_proj", "model.norm", "post_attention_layernorm", True, True),
    "stablelm": FamilyNames("self_attn.o_proj", "model.norm", "post_attention_layernorm", True,
                            False),
    "phi": FamilyNames("self_attn.dense", "model.final_layernorm", None, False, False),
}


def unfuse_qkv(fused: torch.Tensor, heads: int, groups: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of convert.fuse_qkv: [(heads + 2 groups) d, ...] -> q [heads d, ...],
    k [groups d, ...], v [groups d, ...]."""
    per_group = heads // groups + 2  # query heads of the group, its key, its value
    d = fused.shape[0] // (groups * per_group)
    rest = fused.shape[1:]
    grouped = fused.reshape(groups, per_group * d, *rest)  # [g, (q_per_g + 2) d, ...]
    q, k, v = grouped.split([(per_group - 2) * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


class _Taker:
    """Reads our state by key, remembering what was read (``leftovers`` names the rest)."""

    def __init__(self, state: State):
        self.state = state
        self.read: set[str] = set()

    def get(self, key: str) -> Optional[torch.Tensor]:
        if key not in self.state:
            return None
        self.read.add(key)
        return self.state[key]

    def need(self, key: str) -> torch.Tensor:
        value = self.get(key)
        if value is None:
            raise ExportError(f"our model state has no {key!r} (first keys: "
                              f"{sorted(self.state)[:4]})")
        return value

    def leftovers(self) -> list[str]:
        return sorted(k for k in self.state if k not in self.read)


def _norm(take: _Taker, ours: str, theirs: str) -> State:
    out = {f"{theirs}.weight": take.need(f"{ours}.weight")}
    bias = take.get(f"{ours}.bias")
    if bias is not None:
        out[f"{theirs}.bias"] = bias
    return out


def _attention(take: _Taker, src: str, dst: str, shape: LMShape, names: FamilyNames) -> State:
    out = {}
    qkv = unfuse_qkv(take.need(f"{src}linear_qkv.weight"), shape.heads, shape.groups)
    bias = take.get(f"{src}linear_qkv.bias")
    if bias is None and names.qkv_bias_required:
        bias = torch.zeros(qkv[0].shape[0] + 2 * qkv[1].shape[0], dtype=qkv[0].dtype)
    biases = (None,) * 3 if bias is None else unfuse_qkv(bias, shape.heads, shape.groups)
    for name, weight, b in zip("qkv", qkv, biases):
        out[f"{dst}self_attn.{name}_proj.weight"] = weight
        if b is not None:
            out[f"{dst}self_attn.{name}_proj.bias"] = b
    out[f"{dst}{names.out_proj}.weight"] = take.need(f"{src}linear_proj.weight")
    proj_bias = take.get(f"{src}linear_proj.bias")
    if proj_bias is not None:
        out[f"{dst}{names.out_proj}.bias"] = proj_bias
    return out


def _mlp(take: _Taker, src: str, dst: str, names: FamilyNames) -> State:
    fc1 = take.need(f"{src}linear_fc1.weight")
    if names.gated_mlp:
        gate, up = fc1.chunk(2, dim=0)  # [f, h] each: megatron's SwiGLU silu(first) * second
        out = {f"{dst}gate_proj.weight": gate, f"{dst}up_proj.weight": up,
               f"{dst}down_proj.weight": take.need(f"{src}linear_fc2.weight")}
        for linear in ("linear_fc1", "linear_fc2"):
            if take.get(f"{src}{linear}.bias") is not None:
                raise ExportError(f"{src}{linear}.bias: the gated MLP of this family has no "
                                  "biases")
        return out
    out = {f"{dst}fc1.weight": fc1, f"{dst}fc2.weight": take.need(f"{src}linear_fc2.weight")}
    for ours, theirs in (("linear_fc1", "fc1"), ("linear_fc2", "fc2")):
        bias = take.get(f"{src}{ours}.bias")
        if bias is not None:
            out[f"{dst}{theirs}.bias"] = bias
    return out


def export_dense_lm(state: State, shape: LMShape, family: str,
                    prefix: str = "model.layers.{i}") -> State:
    """Our dense (or expert-view) GPTModel state -> the family's transformers causal-LM state.

    ``prefix``: the layer prefix of the output names (MoE-LLaVA's Qwen-1 would differ; every
    family here uses ``model.layers.{i}``)."""
    names = FAMILY_NAMES[family]
    take = _Taker(state)
    out = {"model.embed_tokens.weight": take.need("embedding.word_embeddings.weight")}
    for i in range(shape.num_layers):
        src, dst = f"decoder.layers.{i}.", prefix.format(i=i) + "."
        out.update(_norm(take, f"{src}input_layernorm", f"{dst}input_layernorm"))
        out.update(_attention(take, f"{src}self_attention.", dst, shape, names))
        if names.post_norm is not None:
            out.update(_norm(take, f"{src}pre_mlp_layernorm", f"{dst}{names.post_norm}"))
        out.update(_mlp(take, f"{src}mlp.", f"{dst}mlp.", names))
    out.update(_norm(take, "decoder.final_layernorm", names.final_norm))
    head = take.get("output_layer.weight")
    if head is not None and not shape.tied:
        out["lm_head.weight"] = head
    head_bias = take.get("output_layer.bias")
    if head_bias is not None:
        out["lm_head.bias"] = head_bias
    leftovers = [k for k in take.leftovers() if not k.endswith(_IGNORED_BUFFERS)]
    if leftovers:
        raise ExportError(f"the {family} exporter has no place for {len(leftovers)} tensors of "
                          f"our model, e.g. {leftovers[:4]}")
    return out


# buffers megatron keeps that are not weights (rotary inverse frequencies are recomputed)
_IGNORED_BUFFERS = ("rotary_pos_emb.inv_freq",)


def without_router_biases(state: State) -> State:
    """Our state less the routers' biases, which must be zero: megatron-core gives the router
    a bias with --add-bias-linear (transformer/moe/router.py:56-61, randomly initialised and
    trained), neither DeepSpeed's gate (MoE-LLaVA) nor transformers' Qwen2-MoE gate has one."""
    out = {}
    for key, value in state.items():
        if key.endswith(".mlp.router.bias"):
            if value.abs().max() > 0:
                raise ExportError(f"{key} is not zero (max |b| {float(value.abs().max()):.3g}): "
                                  "the router was trained with a bias (--add-bias-linear), "
                                  "which the exported formats' routers do not have")
            continue
        out[key] = value
    return out
