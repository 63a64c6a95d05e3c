"""What eval builds: the model of the training flags with the checkpoint's weights, nothing else.

No optimizer, no DDP, no data set or sampler, no dense-checkpoint upcycling or
``--pretrained-checkpoint`` load (the checkpoint's weights replace them): megatron-core's
parallel state for this run's layout, the model (``training/setup.build_model``), the
weights of ``--load`` resharded to this layout by dist_checkpointing
(``training/checkpoint.load_module_weights``: the model's weights only, so any saved EP
layout loads on any number of ranks), the tokenizer and the image loader.

The tokenizer: ``--tokenizer-model`` when given; otherwise the SentencePiece model the
training run trained on its data at first run, found in the run's cache (``--cache-dir`` or
``<save>/cache``) by the fingerprint of the training texts, which needs ``--data-path``
(its index is read, built if absent). Eval never trains a tokenizer: a model that is not in
the cache is an error that says so.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_stgc.config import ConfigError, RunConfig


@dataclass
class EvalModel:
    model: torch.nn.Module  # MoELLaVAModel or GPTModel, eval mode
    tokenizer: object
    image_loader: Optional[object]  # ImagePreprocessor (vision-language models)
    image_token_id: Optional[int]
    num_image_tokens: int
    iteration: int  # of the loaded checkpoint


def training_tokenizer_path(config: RunConfig) -> str:
    """The cached SentencePiece model the training run of ``config`` trained (never trains)."""
    from megatron_stgc.data.tokenizer import cached_tokenizer_path, fingerprint
    from megatron_stgc.training.train import cache_dir_for

    cache = cache_dir_for(config)
    if config.vision.vision_model_type is not None:
        if config.data.data_path is None:
            raise ConfigError("eval needs --tokenizer-model, or --data-path and the run's cache "
                              "to find the tokenizer the training run trained")
        from megatron_stgc.data.llava_dataset import tokenizer_training_texts
        from megatron_stgc.data.llava_mix import open_llava_mix

        mix = open_llava_mix(config.data.data_path, config.data.image_root, cache,
                             config.data.allow_image_outside_root)  # as training opened it
        texts = tokenizer_training_texts(mix)
    else:
        from megatron_stgc.data.dataset import text_conversations, tokenizer_texts

        texts = tokenizer_texts(text_conversations(config.data.data_path, config.data.num_samples))
    path = cached_tokenizer_path(cache, fingerprint(texts), config.data.vocab_size)
    if not os.path.isfile(path):
        raise ConfigError(f"eval: no --tokenizer-model, and the tokenizer the training run "
                          f"trained on --data-path is not in its cache ({path} is missing; "
                          "--cache-dir / --save name the cache): pass --tokenizer-model")
    return path


def eval_tokenizer(config: RunConfig):
    """--tokenizer-model, or the training run's cached one (found on rank 0, then shared)."""
    from megatron_stgc.data.tokenizer import Tokenizer, load_tokenizer

    if config.data.tokenizer_model is not None:
        return load_tokenizer(config.data.tokenizer_model)
    found: list = [None]
    if dist.get_rank() == 0:
        try:
            found[0] = ("path", training_tokenizer_path(config))
        except (ConfigError, ValueError, OSError) as error:
            found[0] = ("error", str(error))
    dist.broadcast_object_list(found, src=0)
    kind, value = found[0]
    if kind == "error":
        raise ConfigError(value)
    return Tokenizer(value)


def model_config(config: RunConfig) -> RunConfig:
    """The flags eval builds the model from: the checkpoint replaces any pretrained weights."""
    config = copy.deepcopy(config)
    config.vision.pretrained_checkpoint = None
    config.vision.moe_use_upcycling = False
    return config


def build_eval_model(config: RunConfig) -> EvalModel:
    """Parallel state, tokenizer, model with the --load weights (call after
    ``parallel.initialize_distributed``)."""
    from megatron_stgc import parallel
    from megatron_stgc.model.vision import num_image_tokens
    from megatron_stgc.training.checkpoint import load_module_weights
    from megatron_stgc.training.setup import build_model
    from megatron_stgc.training.train import image_preprocessor, padded_vocab_size, seed_everything

    p = config.parallel
    parallel.initialize_model_parallel(p.tensor_model_parallel_size,
                                       p.expert_model_parallel_size, config.training.seed,
                                       p.expert_tensor_parallel_size)
    seed_everything(config.training.seed)
    tokenizer = eval_tokenizer(config)
    vision = config.vision.vision_model_type is not None
    image_token_id = tokenizer.vocab_size if vision else None
    vocab = padded_vocab_size(tokenizer.vocab_size + int(vision), p.tensor_model_parallel_size)
    model, _ = build_model(model_config(config), vocab, image_token_id)
    progress = load_module_weights(config.checkpoint.load, model)
    model.eval()
    return EvalModel(model, tokenizer, image_preprocessor(config) if vision else None,
                     image_token_id, num_image_tokens(config) if vision else 0,
                     progress.iteration)
