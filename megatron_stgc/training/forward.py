"""The forward step megatron-core's schedules call: GPT forward + masked LM loss."""

from __future__ import annotations

from functools import partial
from typing import Iterator, Optional

import torch


def masked_lm_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor,
                   padding_mask: Optional[torch.Tensor] = None):
    """Mean LM loss over the answer tokens of one micro-batch.

    Returns (loss, {"lm_loss": [masked loss sum, masked token count], "positions": [real,
    computed]}); the schedule divides the loss by the number of micro-batches, and the
    reported pairs let the logger form the exact token-weighted mean across ranks and the
    real tokens per second (real: not padding by ``padding_mask``, True = padding).
    """
    mask = loss_mask.reshape(-1).float()
    losses = per_token_loss.reshape(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum()
    loss = loss_sum / torch.clamp(num_tokens, min=1.0)
    computed = torch.tensor(float(mask.numel()), device=mask.device)
    real = computed if padding_mask is None else (~padding_mask).sum().float()
    return loss, {"lm_loss": torch.stack([loss_sum.detach(), num_tokens.detach()]),
                  "positions": torch.stack([real, computed])}


# batch keys the model takes besides tokens / position_ids / labels: padding_mask (both
# models: megatron-core's GPTModel has it), the rest only the vision-language model
MODEL_KEYS = ("padding_mask", "images", "modality", "segment_ids")


def to_model_device(batch: dict, model: torch.nn.Module) -> dict:
    """The batch's tensors on the model's device (the data pipeline builds them on the CPU)."""
    device = next(model.parameters()).device
    return {key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()}


def gpt_forward_step(data_iterator: Iterator[dict], model: torch.nn.Module):
    """forward_step_func for megatron-core's get_forward_backward_func().

    Text batches: GPTModel(tokens, position_ids, labels, padding_mask). Vision-language
    batches also carry ``images``, ``modality`` (and ``segment_ids`` when packed), passed on
    to MoELLaVAModel.
    """
    batch = to_model_device(next(data_iterator), model)
    extras = {key: batch[key] for key in MODEL_KEYS if key in batch}
    per_token_loss = model(batch["tokens"], batch["position_ids"], attention_mask=None,
                           labels=batch["labels"], **extras)
    return per_token_loss, partial(masked_lm_loss, batch["loss_mask"],
                                   padding_mask=batch.get("padding_mask"))
