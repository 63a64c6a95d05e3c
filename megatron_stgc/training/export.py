"""``megatron-stgc export``: a checkpoint -> a --pretrained-checkpoint directory (``--format
pretrained``, the default), or a Hugging Face / MoE-LLaVA model (megatron_stgc/export/).

``loaded_model`` builds the model of the given flags in ONE process (so every tensor is
whole) and loads ``--load`` into it (any parallel layout: dist_checkpointing reshards it),
or, without ``--load``, the ``--pretrained-checkpoint`` the flags name (upcycled when
``--moe-use-upcycling`` is set, as training would start). ``run_export`` writes
``OUTPUT/model.pt`` = ``{"model": state dict}`` in the layout ``model/pretrained.py`` reads
(the converter's layout). Typical use: the dense stage-II model of the MoE-LLaVA recipe,
exported and then upcycled into the stage-III MoE model with ``--pretrained-checkpoint OUTPUT
--moe-use-upcycling``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_stgc.config import ConfigError, RunConfig


def model_state_for_export(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full tensors of every parameter and buffer (megatron's ``_extra_state`` left out),
    keyed ``<part>.<name>`` by ``model_parts`` (a text GPT is the ``language_model`` part)."""
    from megatron_stgc.model.llava import model_parts

    state = {}
    for part, module in model_parts(model).items():
        for key, value in module.state_dict().items():
            if not key.endswith("_extra_state") and isinstance(value, torch.Tensor):
                state[f"{part}.{key}"] = value.detach().cpu().clone()
    return state


@dataclass
class LoadedModel:
    """What an export reads: the one-process model and the run's tokenizer and data set."""

    model: torch.nn.Module  # MoELLaVAModel or GPTModel (unwrapped), eval mode
    tokenizer: Any
    dataset: Any
    image_token_id: Optional[int]
    source: str  # "--load DIR iteration N" or "--pretrained-checkpoint DIR"
    iteration: Optional[int]


@contextlib.contextmanager
def loaded_model(config: RunConfig) -> Iterator[LoadedModel]:
    """Build ``config``'s model in this one process and load its weights (see the module
    docstring); parallel state is torn down on exit."""
    from megatron_stgc import parallel
    from megatron_stgc.validation import validate_run_config
    from megatron_stgc.training.checkpoint import load_model_weights
    from megatron_stgc.training.train import build_run, image_token_id_of

    if config.checkpoint.load is None and config.vision.pretrained_checkpoint is None:
        raise ConfigError("export needs --load (a training checkpoint) or "
                          "--pretrained-checkpoint (a converted or exported model)")
    world = parallel.world_size_from_env()
    if world != 1:
        raise ConfigError(f"export runs in one process (got world size {world}); the "
                          "checkpoint is resharded to it")
    config.parallel.expert_model_parallel_size = 1
    config.model.use_te = False  # the local spec's key names are the ones the exporters map
    if config.checkpoint.load is not None:
        config.vision.pretrained_checkpoint = None  # the checkpoint replaces it anyway
        config.vision.moe_use_upcycling = False
    validate_run_config(config, 1)
    parallel.initialize_distributed()
    try:
        dataset, tokenizer, objects = build_run(config)
        model = objects.unwrapped_model
        iteration, source = None, f"--pretrained-checkpoint {config.vision.pretrained_checkpoint}"
        if config.checkpoint.load is not None:
            iteration = load_model_weights(config.checkpoint.load, objects.model).iteration
            source = f"--load {config.checkpoint.load} iteration {iteration}"
        model.eval()
        yield LoadedModel(model, tokenizer, dataset, image_token_id_of(dataset), source, iteration)
        dist.barrier()
    finally:
        parallel.destroy()


def run_export(config: RunConfig, output: str) -> str:
    """Load the checkpoint into a one-process model and write ``output``/model.pt; its path."""
    with loaded_model(config) as loaded:
        os.makedirs(output, exist_ok=True)
        path = os.path.join(output, "model.pt")
        tmp = path + ".tmp"
        torch.save({"model": model_state_for_export(loaded.model),
                    "iteration": loaded.iteration}, tmp)
        os.replace(tmp, path)
        print(f"export: {loaded.source} -> {path}", flush=True)
        return path
