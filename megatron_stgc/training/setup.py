"""Model + DDP + optimizer + LR scheduler for a RunConfig (megatron-core pieces only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_stgc.config import RunConfig
from megatron_stgc.model.freeze import apply_freezing
from megatron_stgc.model.gpt import build_gpt_model
from megatron_stgc.model.param_groups import describe_trainable


@dataclass
class TrainingObjects:
    """What one rank trains with. ``model`` is a list of DDP-wrapped chunks (one, PP=1)."""

    model: list[DistributedDataParallel]
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    transformer_config: TransformerConfig
    notes: tuple[str, ...] = ()  # what model building did (pretrained weights, freezing)

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        """The GPTModel or MoELLaVAModel inside DDP (for hooks, state dicts, inspection)."""
        return self.model[0].module


def wrap_ddp(model: torch.nn.Module, config: RunConfig) -> DistributedDataParallel:
    """megatron-core DDP: fp32 grad buffers (main grads), DP/expert-DP all-reduce."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=config.parallel.use_distributed_optimizer,
        check_for_nan_in_grad=True,
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def optimizer_config_from(config: RunConfig) -> OptimizerConfig:
    t = config.training
    return OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        clip_grad=t.clip_grad,
        bf16=config.precision.bf16,
        params_dtype=torch.bfloat16 if config.precision.bf16 else torch.float32,
        use_distributed_optimizer=config.parallel.use_distributed_optimizer,
    )


def build_scheduler(optimizer: MegatronOptimizer, config: RunConfig) -> OptimizerParamScheduler:
    t = config.training
    decay = t.train_iters if t.lr_decay_iters is None else t.lr_decay_iters
    warmup = (int(t.lr_warmup_fraction * t.train_iters) if t.lr_warmup_iters is None
              else t.lr_warmup_iters)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup > 0 else t.lr,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=decay,
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=t.train_iters,
        wd_incr_style="constant",
    )


def build_model(config: RunConfig, vocab_size: int,
                image_token_id: Optional[int] = None) -> tuple[torch.nn.Module, list[str]]:
    """GPTModel, or MoELLaVAModel with --vision-model-type; pretrained weights and freezing
    applied. Returns (model, notes for the log)."""
    from megatron_stgc.mcore_compat import reset_moe_metrics

    reset_moe_metrics()  # a new model starts from megatron's empty per-layer metric tracker
    model = build_gpt_model(config, vocab_size)
    if config.vision.vision_model_type is not None:
        from megatron_stgc.model.llava import build_llava_model

        if image_token_id is None:
            raise ValueError("a vision-language model needs the image token id")
        model = build_llava_model(config, model, image_token_id)
    notes = []
    if config.stgc.enabled:
        from megatron_stgc.mcore_compat import version_note
        from megatron_stgc.model.gpt import stgc_layer_indices

        notes.append(f"STGC on decoder layers {stgc_layer_indices(model)} (0-based; "
                     f"{version_note()})")
    if config.vision.pretrained_checkpoint is not None:
        from megatron_stgc.model.pretrained import load_pretrained

        notes.append(load_pretrained(model, config, vocab_size))
    frozen = apply_freezing(model, config)
    if frozen:
        notes.append(f"frozen: {len(frozen)} parameter tensors ("
                     + _what_decides_training(config) + ")")
    notes.append(describe_trainable(model))
    return model, notes


def _what_decides_training(config: RunConfig) -> str:
    v = config.vision
    flags = [flag for flag, on in (("--freeze-vit", v.freeze_vit),
                                   ("--freeze-projection", v.freeze_projection),
                                   ("--freeze-lm-except-moe", v.freeze_lm_except_moe),
                                   ("--freeze-language-model", v.freeze_language_model))
             if on]
    if v.trainable_modules is not None:
        flags.insert(0, f"--trainable-modules {v.trainable_modules}")
    return " ".join(flags)


def build_model_and_optimizer(config: RunConfig, vocab_size: int,
                              image_token_id: Optional[int] = None) -> TrainingObjects:
    """Build this rank's model (DDP-wrapped), optimizer and LR scheduler in-process.

    Call after ``parallel.initialize_distributed`` and
    ``parallel.initialize_model_parallel``. The model's TransformerConfig gets
    megatron-core's gradient finalisation (DP / expert-DP all-reduce, layer-norm
    and embedding grads), ``no_sync`` for gradient accumulation and the
    optimizer's loss scaling, so ``get_forward_backward_func()`` runs the full
    step. STGC (``config.stgc.enabled``) enters through the layer spec.
    """
    gpt, notes = build_model(config, vocab_size, image_token_id)
    ddp = wrap_ddp(gpt, config)
    model = [ddp]
    optimizer = get_megatron_optimizer(optimizer_config_from(config), model)
    transformer_config = gpt.config
    transformer_config.finalize_model_grads_func = finalize_model_grads
    transformer_config.no_sync_func = ddp.no_sync
    transformer_config.grad_scale_func = optimizer.scale_loss
    return TrainingObjects(model, optimizer, build_scheduler(optimizer, config), transformer_config,
                           tuple(notes))
