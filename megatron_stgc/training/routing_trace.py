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

megatron's hook skips a router call whose bool routing map does not hold exactly topk
experts per token (tokens dropped by --moe-expert-capacity-factor, LTDR's variable experts
per token). We write those records ourselves through the tracer's public
``record_indices`` (same format): each token's experts in ascending order, the row padded
with -1 (a slot whose choice was dropped, or a token with fewer experts) to the widest
row (at least topk; then ``topk`` is that width), and ``"short_rows": true``.
``RoutingTrace.completed`` counts them; the training loop reports the count at the end.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from megatron_stgc.mcore_compat import router_tracer_class
from megatron_stgc.training.expert_load import _inside_backward


_DECODER_LAYER = re.compile(r"decoder\.layers\.(\d+)\.")  # as megatron names its layers


def decoder_layer(module_name: str, router) -> int:
    """The router's layer as megatron's tracer numbers it: its position in decoder.layers."""
    found = _DECODER_LAYER.search(module_name)
    return int(found.group(1)) if found else router.layer_number - 1


def padded_experts(routing_map: torch.Tensor, topk: int) -> torch.Tensor:
    """int32 [tokens, width]: each token's experts ascending, -1 in unused slots;
    routing_map: bool [tokens, experts]; width = max(topk, most experts of a token)."""
    num_experts = routing_map.shape[1]
    experts = torch.arange(num_experts, device=routing_map.device).expand_as(routing_map)
    chosen_first = torch.where(routing_map, experts, experts + num_experts)  # [tokens, experts]
    width = max(topk, int(routing_map.sum(dim=1).max()) if routing_map.numel() else topk)
    slots = chosen_first.argsort(dim=1)[:, :width]  # [tokens, width]
    return torch.where(routing_map.gather(1, slots), slots, -1).to(torch.int32)


class RoutingTrace:
    """megatron-core's RouterTracer on ``chunks`` plus the modality of each traced token."""

    def __init__(self, directory: str, max_steps: int, rank: int, chunks: list,
                 modality_context=None):
        from megatron.core.transformer.moe.router import TopKRouter
        from megatron.core.utils import unwrap_model

        self.tracer = router_tracer_class()(directory, max_steps, rank, training_mode=True)
        self.tracer.register_hooks(chunks)  # megatron's hooks first: ours see their record
        self.modality_context = modality_context
        self.max_steps = max_steps
        self.steps = 0
        self.completed = 0
        self.handles = []
        for chunk in chunks:
            for name, router in unwrap_model(chunk).named_modules():
                if isinstance(router, TopKRouter):
                    self.handles.append(router.register_forward_pre_hook(self._before))
                    self.handles.append(router.register_forward_hook(
                        self._after_hook(decoder_layer(name, router))))
        self._records_before = 0

    @property
    def path(self) -> str:
        return self.tracer.output_path

    def _before(self, router, args) -> None:
        self._records_before = len(self.tracer.records)

    def _after_hook(self, layer: int):
        def after(router, args, output) -> None:
            if len(self.tracer.records) == self._records_before:  # megatron's hook skipped it
                self._complete(router, layer, output[1])
            self._add_fields(self.tracer.records[-1])
        return after

    def _complete(self, router, layer: int, routing_map: torch.Tensor) -> None:
        """Record a call megatron's hook skipped (rows not exactly topk experts)."""
        routing_map = routing_map.reshape(-1, routing_map.shape[-1]).bool()
        self.tracer.record_indices([padded_experts(routing_map, router.topk)],
                                   layer_ids=[layer])
        self.tracer.records[-1]["short_rows"] = True
        self.completed += 1

    def _add_fields(self, record: dict) -> None:
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
    skipped = (f"; {trace.completed} records with short rows (dropped tokens, padded with -1)"
               if trace.completed else "")
    return f"routing trace: {trace.steps} steps in {trace.path}{skipped}"
