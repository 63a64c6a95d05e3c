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
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_stgc import parallel
from megatron_stgc.config import RunConfig
from megatron_stgc.validation import validate_run_config
from megatron_stgc.data.data_errors import (MIN_BAD_IN_USE, check_in_use_health,
                                            check_index_health, check_text_health)
from megatron_stgc.data.dataset import PackedDataset, build_dataset
from megatron_stgc.data.loader import BatchStream
from megatron_stgc.data.tokenizer import Tokenizer
from megatron_stgc.training import elastic
from megatron_stgc.training.checkpoint import (TrainProgress, load_checkpoint,
                                               load_model_weights, read_tracker,
                                               save_checkpoint)
from megatron_stgc.training.expert_load import ExpertLoadCounter
from megatron_stgc.training.routing_trace import start_routing_trace, trace_report
from megatron_stgc.training.guards import install_nonfinite_guard
from megatron_stgc.training.interval_metrics import IntervalMetrics, is_log_step
from megatron_stgc.training.logging import StepLogger, open_wandb
from megatron_stgc.training.routing_stability import (start_routing_stability,
                                                      stop_routing_stability)
from megatron_stgc.training.setup import TrainingObjects, build_model_and_optimizer
from megatron_stgc.training.stgc_hooks import (register_stgc_metrics, run_train_step,
                                               unregister_stgc_metrics)
from megatron_stgc.training.ltdr_hooks import register_ltdr_metrics, unregister_ltdr_metrics
from megatron_stgc.training.validation import Validation
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


def build_vision_language_data(config: RunConfig, tokenizer=None):
    """The LLaVA data set (index, tokenizer, image loader) for --vision-model-type runs;
    with ``tokenizer`` (the training run's), the --valid-data-path records instead."""
    from megatron_stgc.data.llava_dataset import build_llava_dataset
    from megatron_stgc.data.sequences import sequence_multiple
    from megatron_stgc.model.vision import num_image_tokens

    loader = image_preprocessor(config)
    validation = tokenizer is not None
    grouping = None
    if config.data.group_by_modality_length and not validation:
        grouping = (config.training.global_batch_size, config.training.micro_batch_size)
    return build_llava_dataset(
        config.data.valid_data_path if validation else config.data.data_path,
        config.data.image_root, cache_dir_for(config),
        seed=config.training.seed, seq_length=config.model.seq_length,
        num_image_tokens=num_image_tokens(config), image_loader=loader,
        tokenizer_model=config.data.tokenizer_model, vocab_size=config.data.vocab_size,
        allow_image_outside_root=config.data.allow_image_outside_root,
        chat_template=config.data.chat_template,
        pad_to_multiple=sequence_multiple(config), pack=config.data.use_packed_sequence,
        grouping=grouping, tokenizer=tokenizer,
        data_flag="--valid-data-path" if validation else "--data-path")


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

    return rank_zero_first(build)


def rank_zero_first(build):
    """``build()`` on rank 0, then, after a barrier, on the other ranks (rank 0 may train a
    tokenizer or write an index that the others then read from the cache)."""
    result = build() if dist.get_rank() == 0 else None
    dist.barrier()
    return result if result is not None else build()


def prepare_validation_data(config: RunConfig, tokenizer: Tokenizer):
    """The --valid-data-path records, read with the training tokenizer (rank 0 first: it
    may build the LLaVA index), or None without the flag."""
    from megatron_stgc.data.data_errors import DataError

    if config.data.valid_data_path is None:
        return None

    def build():
        if config.vision.vision_model_type is not None:
            return build_vision_language_data(config, tokenizer)[0]
        return build_dataset(
            seq_length=config.model.seq_length, seed=config.training.seed,
            cache_dir=cache_dir_for(config), data_path=config.data.valid_data_path,
            tokenizer=tokenizer)[0]

    dataset = rank_zero_first(build)
    if len(dataset) == 0:
        raise DataError(f"--valid-data-path {' '.join(config.data.valid_data_path)}: no usable "
                        "records")
    return dataset


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


def global_bad_sample_count(dataset) -> int:
    """Records found unusable while loading batches, summed over data-parallel ranks."""
    total = torch.tensor([dataset.bad_samples.total], dtype=torch.long,
                         device=parallel.collective_device())
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return int(total)


def merged_bad_samples(dataset):
    """The in-use bad-sample counters of the data-parallel ranks, merged (collective; the
    ranks of a tensor-parallel group read the same data and are counted once)."""
    from megatron_stgc.data.llava_index import BadSampleCounter

    group = parallel_state.get_data_parallel_group()
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, dataset.bad_samples, group=group)
    return BadSampleCounter.merged(gathered)


def data_report(dataset) -> str:
    """The data set's bad-sample report with the in-use counts of all ranks merged."""
    from megatron_stgc.data.llava_index import BadSampleCounter

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (dataset.bad_samples, dataset.truncated))
    merged = BadSampleCounter.merged([counter for counter, _ in gathered])
    return dataset.report(merged, sum(truncated for _, truncated in gathered),
                          scope=" (all ranks)")


def check_data_before_training(config: RunConfig, dataset, logger: StepLogger,
                               data_flag: str = "--data-path") -> None:
    """Print the index report (records usable per file, bad kinds, modalities) and stop when
    the data cannot train this run (data/data_errors.py); the same decision on every rank.
    data_flag: the flag that named the files (--valid-data-path for the validation set)."""
    index = getattr(dataset, "index", None)
    if index is not None:
        logger.message(index.report())
        check_index_health(index, config.data.max_bad_sample_fraction,
                           needs_images=config.vision.vision_model_type is not None,
                           data_flag=data_flag)
    bad = getattr(dataset, "bad_records", None)  # the text-only loader's
    if bad is not None:
        logger.message(bad.report().replace("bad samples:", f"bad records in {data_flag}:"))
        check_text_health(bad, dataset.num_records, config.data.max_bad_sample_fraction,
                          data_flag=data_flag)


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
    save = config.checkpoint.save
    if config.checkpoint.finetune and save is not None and read_tracker(save) is not None:
        logger.message(f"--finetune: {save} has this run's checkpoints; resuming from them")
        load = save  # a restarted fine-tuning run goes on, it does not start over
    elif config.checkpoint.finetune:  # Megatron-LM's --finetune: weights only, iteration 0
        saved = load_model_weights(load, objects.model)
        logger.message(f"--finetune: weights of {load} iteration {saved.iteration}; "
                       "starting at iteration 0 with a fresh optimizer")
        return TrainProgress()
    restore = getattr(dataset, "restore_data_state", None)
    progress = load_checkpoint(load, objects.model, objects.optimizer, objects.scheduler,
                               restore_data_state=restore,
                               load_optim=not config.checkpoint.no_load_optim,
                               load_rng=not config.checkpoint.no_load_rng)
    logger.message(f"resumed from {load} at iteration {progress.iteration} "
                   f"({progress.consumed_samples} samples consumed)")
    return progress


def batch_stream(config: RunConfig, dataset, progress: TrainProgress) -> BatchStream:
    """This rank's micro-batches from the resumed step on (--num-workers ahead of the step)."""
    t = config.training
    return BatchStream(dataset, t.global_batch_size, t.micro_batch_size,
                       parallel_state.get_data_parallel_rank(),
                       parallel_state.get_data_parallel_world_size(),
                       start_step=progress.iteration, end_step=t.train_iters,
                       num_workers=config.data.num_workers)


def log_interval_record(config: RunConfig, interval: IntervalMetrics, progress: TrainProgress,
                        guard, dataset) -> dict[str, Any]:
    """Reduce the steps since the last log step into one record; check loss and data."""
    record, losses = interval.record(progress.iteration, progress.consumed_samples)
    record["skipped_steps"] = guard.skipped_steps
    if hasattr(dataset, "bad_samples"):
        record["bad_samples_in_use"] = global_bad_sample_count(dataset)
    for loss in losses:
        guard.check_loss(loss)
    if record.get("bad_samples_in_use", 0) >= MIN_BAD_IN_USE:  # the same on every rank
        check_in_use_health(merged_bad_samples(dataset), progress.consumed_samples,
                            config.data.max_bad_sample_fraction)
    return record


def train_loop(config: RunConfig, objects: TrainingObjects, dataset: PackedDataset,
               progress: TrainProgress, logger: StepLogger,
               valid_dataset=None) -> list[dict[str, Any]]:
    """Steps from ``progress`` to --train-iters (or --exit-interval); saves as configured;
    validates on ``valid_dataset`` (--valid-data-path) every --eval-interval steps and at the
    end. Returns the log records (one per log step, see training/interval_metrics.py; a
    validation step is a log step and its record has valid/*: training/validation.py)."""
    t, ckpt = config.training, config.checkpoint
    n_micro = num_microbatches(config)
    expert_load = ExpertLoadCounter(objects.unwrapped_model)
    guard = install_nonfinite_guard(objects.model, objects.optimizer, t.nan_policy)
    interval = IntervalMetrics(config, expert_load, n_micro)
    validation = (None if valid_dataset is None else
                  Validation(config, objects, valid_dataset, expert_load, n_micro))
    stream = batch_stream(config, dataset, progress)
    stability = start_routing_stability(config, objects, expert_load, dataset)
    trace = start_routing_trace(config, objects)  # --moe-routing-trace-path
    records = []
    last_saved = progress.iteration if config.checkpoint.load else None
    started_at = progress.iteration
    try:
        while progress.iteration < t.train_iters:
            guard.iteration = progress.iteration + 1
            set_router_step(objects.model, progress.iteration)  # Gumbel noise keyed on the step
            result = run_train_step(config, objects, stream.next_step(), n_micro,
                                    progress.iteration)
            if trace is not None:
                trace.end_step(progress.iteration)  # 0-based step, as Megatron-LM's
            progress.iteration += 1
            progress.consumed_samples += t.global_batch_size
            interval.add_step(result)
            if stability is not None:
                stability.end_step()
            saving = bool(ckpt.save and ckpt.save_interval
                          and progress.iteration % ckpt.save_interval == 0)
            exiting = bool(t.exit_interval and progress.iteration - started_at >= t.exit_interval)
            last = exiting or progress.iteration == t.train_iters
            validating = validation is not None and validation.due(progress.iteration)
            if is_log_step(config, progress.iteration, saving, last) or validating:
                record = log_interval_record(config, interval, progress, guard, dataset)
                if validating:
                    record.update(validation.run(progress.iteration))
                    interval.restart_clock()  # validation time is no step's time
                logger.log(record)
                records.append(record)
            if saving:
                save_checkpoint(ckpt.save, objects.model, objects.optimizer, objects.scheduler,
                                progress, keep_last=ckpt.keep_last,
                                data_state=data_state_of(dataset))
                last_saved = progress.iteration
            if exiting:
                break
    finally:
        stream.close()
        stop_routing_stability()
        if trace is not None:
            trace.close()
            logger.message(trace_report(trace))
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
                            config.logging.log_file, config.logging.tensorboard_dir,
                            wandb_run=open_wandb(config) if dist.get_rank() == 0 else None)
        logger.message(_describe(config, objects, tokenizer, dataset))
        for note in objects.notes:
            logger.message(note)
        check_data_before_training(config, dataset, logger)
        valid_dataset = prepare_validation_data(config, tokenizer)
        if valid_dataset is not None:
            logger.message("validation records (--valid-data-path):")
            check_data_before_training(config, valid_dataset, logger, "--valid-data-path")
        progress = resume_or_start(config, objects, logger, dataset)
        register_stgc_metrics(config, objects)
        register_ltdr_metrics(config, objects)
        try:
            records = train_loop(config, objects, dataset, progress, logger, valid_dataset)
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
