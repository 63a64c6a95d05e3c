"""The paper's two-pass recipe, kept as the reference for single-pass and for benchmarks.

Pass 1 (identify): forward + backward of every micro-batch; each STGC layer finds its
conflicting pairs and queues them; the router gets no L_token; the gradients are
then thrown away (no parameter update). Pass 2 (apply): forward + backward of the
same micro-batches in the same order; each layer applies L_token with pass 1's
conflicts. The parameter gradients equal single-pass's (same routing, same flags).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch

from megatron_stgc.stgc.attached import stgc_layers
from megatron_stgc.stgc.record import APPLY, IDENTIFY, SINGLE_PASS


@contextmanager
def stgc_mode(model, mode: str):
    """Run the enclosed forwards/backwards in one STGC mode, then back to single-pass."""
    layers = list(stgc_layers(model))
    for layer in layers:
        layer.stgc.mode = mode
    try:
        yield layers
    finally:
        for layer in layers:
            layer.stgc.mode = SINGLE_PASS


def _identify_then_apply(model, identify: Callable[[], object], apply: Callable[[], object]):
    """Run ``identify`` in identify mode and ``apply`` in apply mode; returns apply's result.

    Every micro-batch the identify pass queued must be consumed by the apply pass.
    """
    with stgc_mode(model, IDENTIFY) as layers:
        identify()
    with stgc_mode(model, APPLY):
        result = apply()
    leftover = [layer.stgc.layer_number for layer in layers if layer.stgc.identified]
    for layer in layers:
        layer.stgc.identified.clear()
    if leftover:
        raise RuntimeError(
            f"STGC two-pass: layers {leftover} saw fewer micro-batches in the apply pass "
            "than in the identify pass"
        )
    return result


def two_pass_forward_backward(
    model, forward_backward: Callable[[], object], zero_grads: Callable[[], None]
):
    """Identify with one forward_backward(), drop its gradients, apply with a second.

    forward_backward runs every micro-batch of the step (forward and backward) and
    must replay the same micro-batches both times; zero_grads clears the gradients
    (e.g. DDP's zero_grad_buffer). Returns what the second call returns.
    """

    def identify():
        forward_backward()
        zero_grads()

    return _identify_then_apply(model, identify, forward_backward)


def zero_module_grads(model) -> None:
    for chunk in model if isinstance(model, (list, tuple)) else [model]:
        for param in chunk.parameters():
            param.grad = None
            if hasattr(param, "main_grad") and param.main_grad is not None:
                torch.nn.init.zeros_(param.main_grad)


def _check_identify_can_skip_reduction(chunks, config) -> None:
    """Settings under which skipping finalize_model_grads after the identify pass would
    change the apply pass: refused by name."""
    for chunk in chunks:
        if getattr(getattr(chunk, "ddp_config", None), "overlap_grad_reduce", False):
            raise ValueError("STGC two-pass does not support overlap_grad_reduce (the identify "
                             "pass's bucket reductions would still be in flight)")
    if "global_aux_loss" in str(getattr(config, "moe_router_load_balancing_type", "")):
        raise ValueError("STGC two-pass does not support global_aux_loss (its token counts "
                         "would carry the identify pass into the apply pass)")


@contextmanager
def _without_gradient_reduction(model):
    """The identify pass's gradients are thrown away: do not let the schedule reduce them
    over DP and expert-DP (megatron's finalize_model_grads_func, skipped when None)."""
    from megatron.core.utils import get_model_config

    chunks = model if isinstance(model, (list, tuple)) else [model]
    config = get_model_config(chunks[0])
    _check_identify_can_skip_reduction(chunks, config)
    finalize = config.finalize_model_grads_func
    config.finalize_model_grads_func = None
    try:
        yield
    finally:
        config.finalize_model_grads_func = finalize


def two_pass_train_step(train_step, model, data_iterator, num_microbatches: int, **step_kwargs):
    """The paper's recipe around megatron_stgc.training.step.train_step.

    Pass 1 runs megatron-core's forward-backward schedule over the step's
    micro-batches with STGC in identify mode (no optimizer step; train_step of
    pass 2 zeroes the grad buffers first). Pass 2 is an ordinary train_step over
    the same micro-batches with L_token from pass 1's conflicts.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batches = [next(data_iterator) for _ in range(num_microbatches)]
    forward_step_func = step_kwargs.get("forward_step_func")
    schedule_kwargs = dict(
        num_microbatches=num_microbatches,
        seq_length=step_kwargs["seq_length"],
        micro_batch_size=step_kwargs["micro_batch_size"],
    )
    if forward_step_func is None:
        from megatron_stgc.training.forward import gpt_forward_step as forward_step_func

    def identify():
        with _without_gradient_reduction(model):
            get_forward_backward_func()(
                forward_step_func=forward_step_func, data_iterator=iter(batches), model=model,
                forward_only=False, **schedule_kwargs,
            )

    def apply():
        return train_step(model=model, data_iterator=iter(batches),
                          num_microbatches=num_microbatches, **step_kwargs)

    return _identify_then_apply(model, identify, apply)
