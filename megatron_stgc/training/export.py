"""``megatron-stgc export``: a training checkpoint -> a --pretrained-checkpoint directory.

Loads ``--load`` (any parallel layout: dist_checkpointing reshards it) into the
model of the given flags built in ONE process, so every tensor is whole, and
writes ``OUTPUT/model.pt`` = ``{"model": state dict}`` in the layout
``model/pretrained.py`` reads (the converter's layout). Typical use: the dense
stage-II model of the MoE-LLaVA recipe, exported and then upcycled into the
stage-III MoE model with ``--pretrained-checkpoint OUTPUT --moe-use-upcycling``.
"""

from __future__ import annotations

import os

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


def run_export(config: RunConfig, output: str) -> str:
    """Load --load into a one-process model and write ``output``/model.pt; returns its path."""
    from megatron_stgc import parallel
    from megatron_stgc.config import validate_run_config
    from megatron_stgc.training.checkpoint import load_model_weights
    from megatron_stgc.training.train import build_run

    if config.checkpoint.load is None:
        raise ConfigError("export needs --load (the checkpoint to export)")
    world = parallel.world_size_from_env()
    if world != 1:
        raise ConfigError(f"export runs in one process (got world size {world}); the "
                          "checkpoint is resharded to it")
    config.parallel.expert_model_parallel_size = 1
    config.vision.pretrained_checkpoint = None  # the checkpoint replaces it anyway
    config.vision.moe_use_upcycling = False
    validate_run_config(config, 1)
    parallel.initialize_distributed()
    try:
        _, _, objects = build_run(config)
        progress = load_model_weights(config.checkpoint.load, objects.model)
        os.makedirs(output, exist_ok=True)
        path = os.path.join(output, "model.pt")
        tmp = path + ".tmp"
        torch.save({"model": model_state_for_export(objects.unwrapped_model),
                    "iteration": progress.iteration}, tmp)
        os.replace(tmp, path)
        print(f"export: {config.checkpoint.load} iteration {progress.iteration} -> {path}",
              flush=True)
        dist.barrier()
        return path
    finally:
        parallel.destroy()
