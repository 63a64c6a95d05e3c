"""The training entry point: config -> parallel state -> data -> model -> steps.

``run_training(config)`` is what ``megatron-stgc train`` runs on every rank
(launched by torchrun). Everything megatron-core provides is used as is:
parallel_state, GPTModel via layer specs, DDP + finalize_model_grads, the
Megatron optimizer and OptimizerParamScheduler, get_forward_backward_func and
dist_checkpointing.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_stgc import parallel
from megatron_stgc.mcore_compat import report_moe_metrics
from megatron_stgc.config import RunConfig, moe_layer_freq_value, validate_run_config
from megatron_stgc.data.dataset import PackedDataset, build_dataset, micro_batches
from megatron_stgc.data.tokenizer import Tokenizer
from megatron_stgc.training import elastic, metrics
from megatron_stgc.training.checkpoint import (TrainProgress, load_checkpoint, read_tracker,
                                               save_checkpoint)
from megatron_stgc.training.expert_load import ExpertLoadCounter
from megatron_stgc.training.guards import install_nonfinite_guard
from megatron_stgc.training.logging import StepLogger
from megatron_stgc.training.setup import TrainingObjects, build_model_and_optimizer
from megatron_stgc.training.stgc_hooks import (register_stgc_metrics, run_train_step,
                                               unregister_stgc_metrics)
from megatron_stgc.training.ltdr_hooks import register_ltdr_metrics, unregister_ltdr_metrics
from megatron_stgc.training.step import StepResult
from megatron_stgc.routing.spec import set_router_step


def cache_dir_for(config: RunConfig) -> str:
    """Where the trained tokenizer is cached: --cache-dir, <save>/cache, or ~/.cache."""
    if config.data.cache_dir:
        return config.data.cache_dir
    if config.checkpoint.save:
        return os.path.join(config.checkpoint.save, "cache")
    return os.path.join(os.path.expanduser("~"), ".cache", "megatron_stgc")


def image_preprocessor(config: RunConfig):
    """The image loader of --vision-model-type runs (DALI or PIL; CLIP or SigLIP normalisation)."""
    from megatron_stgc.data.images import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD
    from megatron_stgc.data.images import ImagePreprocessor

    v = config.vision
    mean, std = (SIGLIP_MEAN, SIGLIP_STD) if v.vision_model_type == "siglip" else (CLIP_MEAN,
                                                                                   CLIP_STD)
    return ImagePreprocessor(v.img_h, v.img_w, mean, std, backend=config.data.image_loader,
                             max_pixels=config.data.max_image_pixels,
                             pad_to_square=config.data.image_aspect_ratio == "pad")


def build_vision_language_data(config: RunConfig):
    """The LLaVA data set (index, tokenizer, image loader) for --vision-model-type runs."""
    from megatron_stgc.data.llava_dataset import build_llava_dataset
    from megatron_stgc.data.sequences import sequence_multiple
    from megatron_stgc.model.vision import num_image_tokens

    loader = image_preprocessor(config)
    return build_llava_dataset(
        config.data.data_path, config.data.image_root, cache_dir_for(config),
        seed=config.training.seed, seq_length=config.model.seq_length,
        num_image_tokens=num_image_tokens(config), image_loader=loader,
        tokenizer_model=config.data.tokenizer_model, vocab_size=config.data.vocab_size,
        allow_image_outside_root=config.data.allow_image_outside_root,
        chat_template=config.data.chat_template,
        pad_to_multiple=sequence_multiple(config), pack=config.data.use_packed_sequence)


def prepare_data(config: RunConfig) -> tuple[PackedDataset, Tokenizer]:
    """Build the data set on rank 0 first (it may train the tokenizer), then on the others."""
    def build():
        if config.vision.vision_model_type is not None:
            return build_vision_language_data(config)
        return build_dataset(
            seq_length=config.model.seq_length, seed=config.training.seed,
            cache_dir=cache_dir_for(config), data_path=config.data.data_path,
            tokenizer_model=config.data.tokenizer_model, vocab_size=config.data.vocab_size,
            num_samples=config.data.num_samples)

    result = build() if dist.get_rank() == 0 else None
    dist.barrier()
    return result if result is not None else build()


def image_token_id_of(dataset) -> Optional[int]:
    """The id reserved for image positions (vision-language data), else None."""
    return getattr(dataset, "image_token_id", None)


def model_vocab_size(config: RunConfig, tokenizer: Tokenizer, dataset) -> int:
    """Tokenizer vocabulary (+1 for the image token), padded for TP; with a
    --pretrained-checkpoint, the rows of its embedding, which those ids must fit."""
    from megatron_stgc.model.pretrained import fitted_vocab_rows

    extra = 0 if image_token_id_of(dataset) is None else 1
    tp = config.parallel.tensor_model_parallel_size
    if config.vision.pretrained_checkpoint is not None:
        rows = fitted_vocab_rows(config, tokenizer.vocab_size, extra)
        if rows is not None:
            return rows
    return padded_vocab_size(tokenizer.vocab_size + extra, tp)


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int, multiple: int = 128) -> int:
    """Vocab rounded up so the embedding splits evenly over TP ranks (as Megatron pads)."""
    step = multiple * tensor_parallel_size
    return ((vocab_size + step - 1) // step) * step


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def num_microbatches(config: RunConfig) -> int:
    t = config.training
    return t.global_batch_size // (t.micro_batch_size * parallel_state.get_data_parallel_world_size())


def global_step_totals(result: StepResult) -> dict[str, float]:
    """Over the whole global batch (all DP ranks, one all-reduce): the token-weighted mean LM
    loss, the real (non-padding) token positions and all computed positions."""
    totals = torch.zeros(4, dtype=torch.float64, device=parallel.collective_device())
    for micro_batch in result.losses:
        totals[:2] += micro_batch["lm_loss"].to(totals)
        totals[2:] += micro_batch["positions"].to(totals)
    dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    loss_sum, loss_tokens, real, computed = totals.tolist()
    return {"loss": loss_sum / max(loss_tokens, 1.0), "real_tokens": real,
            "computed_positions": computed}


def moe_aux_losses(config: RunConfig, n_micro: int) -> dict[str, float]:
    """megatron-core's tracked MoE losses (mean over MoE layers and micro-batches)."""
    if config.model.num_experts is None:
        return {}
    totals = report_moe_metrics(loss_scale=1.0 / n_micro, num_layers=config.model.num_layers,
                                moe_layer_freq=moe_layer_freq_value(config))
    return {f"moe/{name}": value for name, value in totals.items()}


def step_record(config: RunConfig, progress: TrainProgress, result: StepResult,
                step_time: float, n_micro: int, expert_load: ExpertLoadCounter) -> dict[str, Any]:
    totals = global_step_totals(result)
    record: dict[str, Any] = {
        "iteration": progress.iteration,
        "consumed_samples": progress.consumed_samples,
        "loss": totals["loss"],
        "lr": result.lr,
        "grad_norm": result.grad_norm,
        "update_successful": result.update_successful,
        "step_time_s": step_time,
        "tokens_per_second": totals["real_tokens"] / step_time,  # padding not counted
        "real_token_fraction": totals["real_tokens"] / max(totals["computed_positions"], 1.0),
    }
    record.update(moe_aux_losses(config, n_micro))
    record["tokens_per_expert"] = expert_load.collect()
    if expert_load.by_modality:
        record["tokens_per_expert_by_modality"] = expert_load.collect_by_modality()
    record.update(metrics.collect_registered_metrics())
    return record


def global_bad_sample_count(dataset) -> int:
    """Records found unusable while loading batches, summed over data-parallel ranks."""
    total = torch.tensor([dataset.bad_samples.total], dtype=torch.long,
                         device=parallel.collective_device())
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return int(total)


def data_report(dataset) -> str:
    """The data set's bad-sample report with the in-use counts of all ranks merged."""
    from megatron_stgc.data.llava_index import BadSampleCounter

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (dataset.bad_samples, dataset.truncated))
    merged = BadSampleCounter.merged([counter for counter, _ in gathered])
    return dataset.report(merged, sum(truncated for _, truncated in gathered),
                          scope=" (all ranks)")


def data_state_of(dataset) -> Optional[dict]:
    """This rank's data-set state for the checkpoint (LLaVA: bad-sample counters), or None."""
    return dataset.data_state() if hasattr(dataset, "data_state") else None


def resume_or_start(config: RunConfig, objects: TrainingObjects, logger: StepLogger,
                    dataset=None) -> TrainProgress:
    load = config.checkpoint.load
    if load is None:
        return TrainProgress()
    if read_tracker(load) is None and load == config.checkpoint.save:
        logger.message(f"--load {load}: no checkpoint yet; starting from iteration 0")
        return TrainProgress()
    restore = getattr(dataset, "restore_data_state", None)
    progress = load_checkpoint(load, objects.model, objects.optimizer, objects.scheduler,
                               restore_data_state=restore)
    logger.message(f"resumed from {load} at iteration {progress.iteration} "
                   f"({progress.consumed_samples} samples consumed)")
    return progress


def train_loop(config: RunConfig, objects: TrainingObjects, dataset: PackedDataset,
               progress: TrainProgress, logger: StepLogger) -> list[dict[str, Any]]:
    """Steps from ``progress`` to --train-iters (or --exit-interval); saves as configured."""
    t, ckpt = config.training, config.checkpoint
    n_micro = num_microbatches(config)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    expert_load = ExpertLoadCounter(objects.unwrapped_model)
    guard = install_nonfinite_guard(objects.model, objects.optimizer, t.nan_policy)
    records = []
    last_saved = progress.iteration if config.checkpoint.load else None
    started_at = progress.iteration
    while progress.iteration < t.train_iters:
        start = time.perf_counter()
        guard.iteration = progress.iteration + 1
        batches = micro_batches(dataset, progress.consumed_samples, t.global_batch_size,
                                t.micro_batch_size, dp_rank, dp_size)
        set_router_step(objects.model, progress.iteration)  # Gumbel noise keyed on the step
        result = run_train_step(config, objects, batches, n_micro, progress.iteration)
        step_time = time.perf_counter() - start
        progress.iteration += 1
        progress.consumed_samples += t.global_batch_size
        record = step_record(config, progress, result, step_time, n_micro, expert_load)
        record["skipped_steps"] = guard.skipped_steps
        if hasattr(dataset, "bad_samples"):
            record["bad_samples_in_use"] = global_bad_sample_count(dataset)
        logger.log(record)
        guard.check_loss(record["loss"])
        records.append(record)
        if ckpt.save and ckpt.save_interval and progress.iteration % ckpt.save_interval == 0:
            save_checkpoint(ckpt.save, objects.model, objects.optimizer, objects.scheduler, progress,
                            keep_last=ckpt.keep_last, data_state=data_state_of(dataset))
            last_saved = progress.iteration
        if t.exit_interval and progress.iteration - started_at >= t.exit_interval:
            break
    if ckpt.save and last_saved != progress.iteration:
        save_checkpoint(ckpt.save, objects.model, objects.optimizer, objects.scheduler, progress,
                        keep_last=ckpt.keep_last, data_state=data_state_of(dataset))
    expert_load.remove()
    guard.remove()
    return records


def build_run(config: RunConfig) -> tuple[Any, Tokenizer, TrainingObjects]:
    """megatron-core parallel state, seeds, data set + tokenizer, model + optimizer + scheduler
    for ``config``; call after ``parallel.initialize_distributed`` (train, eval, export)."""
    parallel.initialize_model_parallel(config.parallel.tensor_model_parallel_size,
                                       config.parallel.expert_model_parallel_size,
                                       config.training.seed,
                                       config.parallel.expert_tensor_parallel_size)
    seed_everything(config.training.seed)
    dataset, tokenizer = prepare_data(config)
    objects = build_model_and_optimizer(config, model_vocab_size(config, tokenizer, dataset),
                                        image_token_id_of(dataset))
    return dataset, tokenizer, objects


def run_training(config: RunConfig, destroy_process_groups: bool = True) -> list[dict[str, Any]]:
    """Train with ``config`` on this rank; returns the per-step records.

    Validates the config before any process group exists (ConfigError names
    the flag), then initialises torch.distributed and megatron-core's parallel
    state, builds data, model, optimizer and scheduler, resumes from --load,
    runs the steps and saves to --save.
    """
    validate_run_config(config, parallel.world_size_from_env())
    elastic.init_process_group_after_restart()  # no-op unless torchrun restarted us
    parallel.initialize_distributed()
    try:
        dataset, tokenizer, objects = build_run(config)
        logger = StepLogger(dist.get_rank(), config.training.train_iters,
                            config.logging.log_interval, config.logging.log_file,
                            config.logging.tensorboard_dir)
        logger.message(_describe(config, objects, tokenizer, dataset))
        for note in objects.notes:
            logger.message(note)
        progress = resume_or_start(config, objects, logger, dataset)
        register_stgc_metrics(config, objects)
        register_ltdr_metrics(config, objects)
        try:
            records = train_loop(config, objects, dataset, progress, logger)
            if hasattr(dataset, "bad_samples"):
                logger.message(data_report(dataset))
            return records
        finally:
            unregister_stgc_metrics()
            unregister_ltdr_metrics()
            logger.close()
    finally:
        if destroy_process_groups:
            parallel.destroy()


def _describe(config: RunConfig, objects: TrainingObjects, tokenizer: Tokenizer,
              dataset: PackedDataset) -> str:
    params = sum(p.numel() for p in objects.unwrapped_model.parameters())
    return (f"world {dist.get_world_size()} (TP {config.parallel.tensor_model_parallel_size}, "
            f"EP {config.parallel.expert_model_parallel_size}, "
            f"DP {parallel_state.get_data_parallel_world_size()}) | "
            f"{params} parameters on rank 0 | vocab {tokenizer.vocab_size} | "
            f"{len(dataset)} {'records' if hasattr(dataset, 'index') else 'packed samples'} "
            f"of <= {config.model.seq_length} tokens | "
            f"{num_microbatches(config)} micro-batches per step")
