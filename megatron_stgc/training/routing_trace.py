"""--moe-routing-trace-path: megatron-core's routing tracer, with each token's modality.

megatron-core >= 0.19 ships ``RouterTracer`` (megatron/core/transformer/moe/router_trace.py):
forward hooks on every ``TopKRouter`` that write, per rank, ``router_trace_rank<R>.jsonl`` in
the given directory, one JSON record per router call: ``step``, ``stage``, ``block``,
``layer`` (the position in ``decoder.layers``, 0-based), ``rank``, ``num_tokens``, ``topk``,
``top_indices`` ([num_tokens][topk] expert ids, tokens in megatron's router order: the
micro-batch's [s, b] positions flattened). Megatron-LM's training loop turns it on the same
way (megatron/training/training.py, ``init_moe_router_tracer`` at line 4382 and
``advance_step(iteration)`` at the end of ``train_step``, line 3118; flag in
megatron/training/config/training_config.py, line 369; Megatron-LM d98e8a64dd).

We build our own ``RouterTracer`` (megatron's ``init_moe_router_tracer`` keeps one per
process for good, so a second run in the same process would keep tracing the first model)
and add fields to each record it writes, in the same JSON line (megatron's records are plain
dicts serialised with every key; its MTP records add ``mtp_idx`` the same way):

* ``modality``: [num_tokens] codes of model/modality.py (0 padding, 1 text, 2 image), same
  token order as ``top_indices``; only for a vision-language model (a text-only model has
  no modality context: the field is absent); null if the forward had no modality;
* ``forward``: ``"train"``, ``"recompute"`` (activation recompute re-running the router
  inside the backward pass: megatron records those calls again) or ``"no_grad"`` (a forward
  without gradients, e.g. the routing probe, training/routing_probe.py).

A router call megatron's tracer does not record (its hook skips a bool routing map whose
row count is not num_tokens x topk, i.e. tokens dropped by a capacity factor) is counted in
``RoutingTrace.unrecorded``; the training loop reports the count at the end.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_stgc.mcore_compat import router_tracer_class
from megatron_stgc.training.expert_load import _inside_backward


class RoutingTrace:
    """megatron-core's RouterTracer on ``chunks`` plus the modality of each traced token."""

    def __init__(self, directory: str, max_steps: int, rank: int, chunks: list,
                 modality_context=None):
        from megatron.core.transformer.moe.router import TopKRouter

        self.tracer = router_tracer_class()(directory, max_steps, rank, training_mode=True)
        self.tracer.register_hooks(chunks)  # megatron's hooks first: ours see their record
        self.modality_context = modality_context
        self.max_steps = max_steps
        self.steps = 0
        self.unrecorded = 0
        self.handles = []
        for chunk in chunks:
            for router in chunk.modules():
                if isinstance(router, TopKRouter):
                    self.handles.append(router.register_forward_pre_hook(self._before))
                    self.handles.append(router.register_forward_hook(self._after))
        self._records_before = 0

    @property
    def path(self) -> str:
        return self.tracer.output_path

    def _before(self, router, args) -> None:
        self._records_before = len(self.tracer.records)

    def _after(self, router, args, output) -> None:
        if len(self.tracer.records) == self._records_before:
            self.unrecorded += 1
            return
        record = self.tracer.records[-1]
        record["forward"] = _forward_kind()
        if self.modality_context is not None:
            record["modality"] = self._modality(record["num_tokens"])

    def _modality(self, num_tokens: int) -> Optional[list[int]]:
        """The current tokens' modality codes ([num_tokens], megatron's router order)."""
        current = self.modality_context.current  # int64 [s * b] or None
        if current is None:
            return None
        if current.numel() != num_tokens:
            raise RuntimeError(
                f"--moe-routing-trace-path: the router saw {num_tokens} tokens but the model's "
                f"modality context holds {current.numel()} (a vision-language model with "
                "sequence parallelism is not supported)")
        return current.tolist()

    def end_step(self, iteration: int) -> None:
        """After training step ``iteration`` (0-based, as Megatron-LM's train_step): its
        records go to disk stamped with it; after ``max_steps`` steps tracing stops."""
        if self.steps >= self.max_steps:
            return
        self.tracer.advance_step(iteration)
        self.steps += 1
        if self.steps >= self.max_steps:
            self.remove_hooks()

    def remove_hooks(self) -> None:
        self.tracer.remove_hooks()
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def close(self) -> None:
        """Write what is left (a step cut short) and remove every hook."""
        self.tracer.flush()
        self.remove_hooks()


def _forward_kind() -> str:
    if _inside_backward():
        return "recompute"
    return "train" if torch.is_grad_enabled() else "no_grad"


def start_routing_trace(config, objects) -> Optional[RoutingTrace]:
    """A RoutingTrace on the model of ``objects`` (TrainingObjects) if --moe-routing-trace-path
    is set; tracing --moe-routing-trace-max-training-iters steps, or every step."""
    import torch.distributed as dist

    log = config.logging
    if log.moe_routing_trace_path is None:
        return None
    max_steps = log.moe_routing_trace_max_training_iters or config.training.train_iters
    rank = dist.get_rank() if dist.is_initialized() else 0
    return RoutingTrace(log.moe_routing_trace_path, max_steps, rank, list(objects.model),
                        getattr(objects.unwrapped_model, "modality", None))


def trace_report(trace: RoutingTrace) -> str:
    """One line for the end of training: where this rank's trace is, what it left out."""
    skipped = (f"; {trace.unrecorded} router calls not recorded by megatron's tracer (tokens "
               "dropped by the capacity factor)" if trace.unrecorded else "")
    return f"routing trace: {trace.steps} steps in {trace.path}{skipped}"
