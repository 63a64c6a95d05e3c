"""--pretrained-checkpoint (+ --moe-use-upcycling): start from converted or dense weights.

A pretrained checkpoint is a directory with ``model.pt`` = ``{"model": state
dict}`` whose keys start with ``vision_model.``, ``vision_projection.`` or
``language_model.`` (what tools/convert_hf_to_megatron.py writes; TP=1, the
full tensors). Every part present is loaded strictly; a part that is absent
(the projector, when converting a CLIP and an LLM separately) keeps its
random initialisation and is named in the returned summary.

``--moe-use-upcycling``: the checkpoint's language model is dense. It is
loaded into a dense GPTModel built from the same flags without experts, and
megatron-core's ``upcycle_state_dict`` turns each dense FFN into the MoE
layer's experts (router freshly initialised), MoE-LLaVA's stage III start.
"""

from __future__ import annotations

import copy
import os
from typing import Optional

import torch

from megatron_stgc.config import ConfigError, RunConfig
from megatron_stgc.convert.layouts import matching_layout
from megatron_stgc.model.llava import model_parts

PARTS = ("vision_model", "vision_projection", "language_model")


def read_pretrained(path: str) -> dict[str, dict[str, torch.Tensor]]:
    """{part: state dict without the part prefix} of ``path``/model.pt."""
    state = torch.load(os.path.join(path, "model.pt"), map_location="cpu", weights_only=True)
    state = state["model"] if "model" in state else state
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        part, _, rest = key.partition(".")
        if part not in PARTS:
            raise ValueError(f"--pretrained-checkpoint {path}: key {key!r} belongs to none of "
                             f"{PARTS}")
        parts.setdefault(part, {})[rest] = value
    return parts


EMBEDDING_KEY = "language_model.embedding.word_embeddings.weight"


def pretrained_vocab_rows(path: str) -> Optional[int]:
    """Rows of the checkpoint's word embedding (None without a language model), read
    without loading the weights (memory-mapped)."""
    state = torch.load(os.path.join(path, "model.pt"), map_location="cpu", weights_only=True,
                       mmap=True)
    state = state["model"] if "model" in state else state
    return state[EMBEDDING_KEY].shape[0] if EMBEDDING_KEY in state else None


def fitted_vocab_rows(config: RunConfig, tokenizer_size: int, extra: int) -> Optional[int]:
    """The --pretrained-checkpoint's embedding rows, after checking that the tokenizer's ids
    (+ ``extra``: the image token) fit them; None when it holds no language model."""

    path = config.vision.pretrained_checkpoint
    rows = pretrained_vocab_rows(path)
    if rows is None:
        return None
    needed = tokenizer_size + extra
    tokenizer = config.data.tokenizer_model or "the SentencePiece model trained on the data"
    if needed > rows:
        image = " + 1 image token" if extra else ""
        raise ConfigError(f"--tokenizer-model {tokenizer}: its {tokenizer_size} ids{image} = "
                          f"{needed} do not fit the {rows} embedding rows of "
                          f"--pretrained-checkpoint {path}/model.pt ({EMBEDDING_KEY}); use the "
                          "converted language model's own tokenizer")
    tp = config.parallel.tensor_model_parallel_size
    if rows % tp:
        raise ConfigError(f"--pretrained-checkpoint {path}: {rows} embedding rows do not split "
                          f"over --tensor-model-parallel-size {tp}")
    return rows


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> str:
    """Load ``state`` into ``module``; every parameter must be given (extra_state may be absent).

    The state may be in the local-spec or the Transformer Engine layout (a CPU run's
    checkpoint on a GPU, or back): it is renamed to the module's. Returns the conversion."""
    state, conversion = matching_layout(state, module.state_dict().keys())
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"--pretrained-checkpoint: {what} does not match the model in any "
                         f"known layout (local or Transformer Engine spec): "
                         f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    return conversion


def upcycled_language_state(language_model: torch.nn.Module, dense_state: dict,
                            config: RunConfig, vocab_size: int) -> dict[str, torch.Tensor]:
    """megatron-core's upcycling of a dense GPT state into ``language_model``'s MoE state."""
    from megatron.core.transformer.moe.upcycling_utils import upcycle_state_dict

    from megatron_stgc.model.gpt import build_gpt_model

    dense_config = copy.deepcopy(config)
    dense_config.model.num_experts = None
    dense_config.model.moe_layer_pattern = None
    dense_config.parallel.expert_model_parallel_size = 1  # no experts to place
    dense_config.stgc.enabled = False
    dense_config.ltdr.enabled = False
    dense = build_gpt_model(dense_config, vocab_size)
    _load_strict(dense, dense_state, "the dense language model")
    moe_state = upcycle_state_dict([language_model], [dense])["model"]
    # upcycle_state_dict also emits expert keys for the dense layers between MoE layers
    wanted = language_model.state_dict().keys()
    return {key: value for key, value in moe_state.items() if key in wanted}


def _require_dense(language_state: dict, path: str) -> None:
    """--moe-use-upcycling copies dense FFNs into experts: an MoE checkpoint (routers present,
    e.g. a converted MoE-LLaVA stage-III model) is loaded as it is instead."""
    routers = [key for key in language_state if ".mlp.router." in key]
    if routers:
        raise ValueError(f"--pretrained-checkpoint {path}: the language model is already MoE "
                         f"(it has {routers[0]!r} and {len(routers) - 1} more router weights); "
                         "drop --moe-use-upcycling to load its experts and routers as they are")


def load_pretrained(model: torch.nn.Module, config: RunConfig, vocab_size: int) -> str:
    """Load --pretrained-checkpoint into ``model`` (MoELLaVAModel or GPTModel); a summary."""
    path = config.vision.pretrained_checkpoint
    parts = read_pretrained(path)
    loaded, kept_random = [], []
    for part, module in model_parts(model).items():
        if part not in parts:
            kept_random.append(part)
            continue
        state = parts[part]
        if part == "language_model" and config.vision.moe_use_upcycling:
            _require_dense(state, path)
            state = upcycled_language_state(module, state, config, vocab_size)
            part += " (upcycled)"
        conversion = _load_strict(module, state, part)
        loaded.append(part if conversion == "as saved" else f"{part} ({conversion} layout)")
    summary = f"--pretrained-checkpoint {path}: loaded {', '.join(loaded) or 'nothing'}"
    if kept_random:
        summary += f"; randomly initialised (not in the checkpoint): {', '.join(kept_random)}"
    return summary
