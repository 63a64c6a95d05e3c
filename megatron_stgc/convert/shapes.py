"""The shapes our local-spec modules give each converted tensor, from the converter's flags.

A converted state whose tensor shapes differ from what ``--pretrained-checkpoint`` will build
would only fail later, at the strict load of a training run. ``check_shapes`` compares them
before anything is written and names the key, both shapes and the flags behind the expected
one. Names without a rule here (a family-specific layer) are not checked.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

import torch

from megatron_stgc.convert import ConversionError

Shape = tuple[int, ...]
Rule = tuple[re.Pattern, Callable[[dict, int], Optional[Shape]]]


def _vision_rules() -> list[Rule]:
    def vh(f):
        return f["vision_hidden_size"]

    def vf(f):
        return f["vision_ffn_hidden_size"]

    def positions(f):
        patches = (f["img_h"] // f["patch_dim"]) * (f["img_w"] // f["patch_dim"])
        return patches + (1 if f["vision_model_type"] == "clip" else 0)

    table = {
        r"conv1\.weight": lambda f, v: (vh(f), 3, f["patch_dim"], f["patch_dim"]),
        r"conv1\.bias": lambda f, v: (vh(f),),
        r"class_token": lambda f, v: (1, 1, vh(f)),
        r"position_embeddings\.weight": lambda f, v: (positions(f), vh(f)),
        r"ln_pre\.(weight|bias)": lambda f, v: (vh(f),),
        r"decoder\.layers\.\d+\.(input_layernorm|pre_mlp_layernorm)\.(weight|bias)":
            lambda f, v: (vh(f),),
        r"decoder\.layers\.\d+\.self_attention\.linear_qkv\.weight":
            lambda f, v: (3 * vh(f), vh(f)),
        r"decoder\.layers\.\d+\.self_attention\.linear_qkv\.bias": lambda f, v: (3 * vh(f),),
        r"decoder\.layers\.\d+\.self_attention\.linear_proj\.weight": lambda f, v: (vh(f), vh(f)),
        r"decoder\.layers\.\d+\.(self_attention\.linear_proj|mlp\.linear_fc2)\.bias":
            lambda f, v: (vh(f),),
        r"decoder\.layers\.\d+\.mlp\.linear_fc1\.weight": lambda f, v: (vf(f), vh(f)),
        r"decoder\.layers\.\d+\.mlp\.linear_fc1\.bias": lambda f, v: (vf(f),),
        r"decoder\.layers\.\d+\.mlp\.linear_fc2\.weight": lambda f, v: (vh(f), vf(f)),
    }
    return [(re.compile(f"^{k}$"), rule) for k, rule in table.items()]


def _projector_rules() -> list[Rule]:
    table = {
        r"encoder\.linear_fc1\.weight": lambda f, v: (f["hidden_size"], f["vision_hidden_size"]),
        r"encoder\.linear_fc2\.weight": lambda f, v: (f["hidden_size"], f["hidden_size"]),
        r"encoder\.linear_fc[12]\.bias": lambda f, v: (f["hidden_size"],),
    }
    return [(re.compile(f"^{k}$"), rule) for k, rule in table.items()]


def _language_rules() -> list[Rule]:
    def h(f):
        return f["hidden_size"]

    def head_dim(f):
        return f["hidden_size"] // f["num_attention_heads"]

    def qkv_rows(f):
        groups = f.get("num_query_groups") or f["num_attention_heads"]
        return (f["num_attention_heads"] + 2 * groups) * head_dim(f)

    def fc1_rows(f, ffn):
        return ffn * (2 if f.get("swiglu") else 1)

    def moe_ffn(f):
        return f.get("moe_ffn_hidden_size") or f["ffn_hidden_size"]

    layer = r"decoder\.layers\.\d+\."
    expert = layer + r"mlp\.experts\.local_experts\.\d+\."
    table = {
        r"embedding\.word_embeddings\.weight": lambda f, v: (v, h(f)),
        r"output_layer\.weight": lambda f, v: (v, h(f)),
        r"decoder\.final_layernorm\.(weight|bias)": lambda f, v: (h(f),),
        layer + r"(input_layernorm|pre_mlp_layernorm)\.(weight|bias)": lambda f, v: (h(f),),
        layer + r"self_attention\.linear_qkv\.weight": lambda f, v: (qkv_rows(f), h(f)),
        layer + r"self_attention\.linear_qkv\.bias": lambda f, v: (qkv_rows(f),),
        layer + r"self_attention\.linear_proj\.weight":
            lambda f, v: (h(f), f["num_attention_heads"] * head_dim(f)),
        layer + r"(self_attention\.linear_proj|mlp\.linear_fc2)\.bias": lambda f, v: (h(f),),
        layer + r"mlp\.linear_fc1\.weight": lambda f, v: (fc1_rows(f, f["ffn_hidden_size"]), h(f)),
        layer + r"mlp\.linear_fc1\.bias": lambda f, v: (fc1_rows(f, f["ffn_hidden_size"]),),
        layer + r"mlp\.linear_fc2\.weight": lambda f, v: (h(f), f["ffn_hidden_size"]),
        layer + r"mlp\.router\.weight": lambda f, v: (f["num_experts"], h(f)),
        expert + r"linear_fc1\.weight": lambda f, v: (fc1_rows(f, moe_ffn(f)), h(f)),
        expert + r"linear_fc1\.bias": lambda f, v: (fc1_rows(f, moe_ffn(f)),),
        expert + r"linear_fc2\.weight": lambda f, v: (h(f), moe_ffn(f)),
        expert + r"linear_fc2\.bias": lambda f, v: (h(f),),
    }
    return [(re.compile(f"^{k}$"), rule) for k, rule in table.items()]


RULES = {"vision_model": _vision_rules(), "vision_projection": _projector_rules(),
         "language_model": _language_rules()}


def check_shapes(state: dict[str, torch.Tensor], flags: dict, vocab_rows: Optional[int],
                 source: str) -> None:
    """Every prefixed tensor of ``state`` (``vision_model.`` / ``vision_projection.`` /
    ``language_model.``) must have the shape the flags give it."""
    for key, value in state.items():
        part, _, name = key.partition(".")
        for pattern, rule in RULES.get(part, []):
            if pattern.match(name):
                expected = rule(flags, vocab_rows)
                if tuple(value.shape) != tuple(expected):
                    raise ConversionError(
                        f"{source}: converted {key!r} has shape {list(value.shape)}, but a model "
                        f"built from the checkpoint's config needs {list(expected)} "
                        f"({_flags_note(part, flags)}): the weights do not match the config")
                break


def _flags_note(part: str, flags: dict) -> str:
    keys = {"vision_model": ("vision_hidden_size", "vision_ffn_hidden_size", "patch_dim",
                             "img_h"),
            "vision_projection": ("vision_hidden_size", "hidden_size"),
            "language_model": ("hidden_size", "ffn_hidden_size", "num_attention_heads",
                               "num_query_groups", "num_experts")}[part]
    return ", ".join(f"--{k.replace('_', '-')} {flags.get(k)}" for k in keys if k in flags)
