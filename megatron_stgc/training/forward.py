"""The forward step megatron-core's schedules call: GPT forward + masked LM loss."""

from __future__ import annotations

from functools import partial
from typing import Iterator

import torch


def masked_lm_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Mean LM loss over the answer tokens of one micro-batch.

    Returns (loss, {"lm_loss": [masked loss sum, masked token count]}); the
    schedule divides the loss by the number of micro-batches, and the reported
    pair lets the logger form the exact token-weighted mean across ranks.
    """
    mask = loss_mask.reshape(-1).float()
    losses = per_token_loss.reshape(-1).float()
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum()
    loss = loss_sum / torch.clamp(num_tokens, min=1.0)
    return loss, {"lm_loss": torch.stack([loss_sum.detach(), num_tokens.detach()])}


VISION_KEYS = ("images", "modality")  # batch keys only the vision-language model takes


def to_model_device(batch: dict, model: torch.nn.Module) -> dict:
    """The batch's tensors on the model's device (the data pipeline builds them on the CPU)."""
    device = next(model.parameters()).device
    return {key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()}


def gpt_forward_step(data_iterator: Iterator[dict], model: torch.nn.Module):
    """forward_step_func for megatron-core's get_forward_backward_func().

    Text batches: GPTModel(tokens, position_ids, labels). Vision-language batches
    also carry ``images`` and ``modality``, passed on to MoELLaVAModel.
    """
    batch = to_model_device(next(data_iterator), model)
    extras = {key: batch[key] for key in VISION_KEYS if key in batch}
    per_token_loss = model(batch["tokens"], batch["position_ids"], attention_mask=None,
                           labels=batch["labels"], **extras)
    return per_token_loss, partial(masked_lm_loss, batch["loss_mask"])
