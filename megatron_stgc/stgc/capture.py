"""Capture each expert linear's inputs (forward) and output gradients (backward).

Module forward hooks on the experts' linear_fc1 / linear_fc2 keep a detached
reference to the layer input (the same storage autograd saves anyway) and put a
tensor hook on the output that keeps dL/d(output) when backward reaches it. The
captures of one forward live in one ``ExpertCapture`` owned by that forward's
``ConflictRecord``, so two micro-batches in flight never mix, and a forward under
``no_grad`` (the first pass of activation recompute) captures nothing.

Works for megatron-core's SequentialMLP (one MLP per local expert) and
TEGroupedMLP (one grouped linear for all local experts, rows split per expert).
Under FP8 megatron pads each expert's rows (zeros, appended) to a multiple of 16
before its linears; only the first ``tokens_per_expert[e]`` rows of expert e's
captures are tokens, the rest are dropped.

Memory: the expert side reads a capture once, in backward, then
``ExpertCapture.close`` drops every captured tensor; nothing here holds a capture
after that (the backward bookkeeping keeps only a weak reference).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from megatron_stgc.stgc.conflict_math import LinearGrads

LINEAR_NAMES = ("linear_fc1", "linear_fc2")


@dataclass
class LinearTap:
    """One linear's capture for one forward: inputs now, output grads later."""

    inputs: torch.Tensor | None = None  # [rows, in]
    output_grads: torch.Tensor | None = None  # [rows, out]
    row_splits: list[int] | None = None  # grouped linears: rows per local expert (maybe padded)
    weight_grad: torch.Tensor | None = None  # this backward's dL/dW, as autograd computed it
    bias_grad: torch.Tensor | None = None


@dataclass
class ExpertCapture:
    """Captured linears of one forward: taps[(expert_slot, linear_name)]."""

    taps: dict[tuple[int, str], LinearTap] = field(default_factory=dict)
    closed: bool = False  # set once the expert side has used it
    # mean_source.EarlyMeanReduce: all-reduces started as the weight gradients arrive
    early_reduce: object | None = None

    def tap(self, slot: int, name: str) -> LinearTap:
        return self.taps.setdefault((slot, name), LinearTap())

    def close(self) -> None:
        """Drop every captured tensor; later backward hooks of this forward record nothing."""
        self.closed = True
        self.taps.clear()

    def per_expert_linears(
        self,
        tokens_per_expert: list[int],
        probs: torch.Tensor,
        has_bias: dict[str, bool],
        fc2_bias_scaled_by_prob: bool,
    ) -> list[list[LinearGrads]]:
        """fp32 LinearGrads for each local expert, rows aligned with the dispatched rows."""
        probs = probs.float()
        prob_chunks = torch.split(probs, tokens_per_expert)
        experts = []
        for expert, num_rows in enumerate(tokens_per_expert):
            linears = []
            for name in LINEAR_NAMES:
                inputs, grads = self._rows_of(expert, name, tokens_per_expert)
                coef = None
                if has_bias[name]:
                    scaled = name == "linear_fc2" and fc2_bias_scaled_by_prob
                    coef = prob_chunks[expert] if scaled else torch.ones(num_rows, device=probs.device)
                lin = LinearGrads(inputs.float(), grads.float(), coef)
                tap = self.taps.get((expert, name))
                if tap is not None and tap.weight_grad is not None:
                    lin.known_weight_grad = tap.weight_grad.float()
                    if coef is not None:
                        lin.known_bias_grad = None if tap.bias_grad is None else tap.bias_grad.float()
                linears.append(lin)
            experts.append(linears)
        return experts

    def _rows_of(self, expert: int, name: str, tokens_per_expert: list[int]):
        if (expert, name) in self.taps:  # one module per expert (SequentialMLP)
            tap = self.taps[(expert, name)]
            rows = slice(0, tokens_per_expert[expert])  # drop quantization padding
            return tap.inputs[rows], self._grads(tap, name)[rows]
        tap = self.taps.get((-1, name))  # one grouped module (TEGroupedMLP)
        if tap is None:
            raise RuntimeError(f"STGC: no capture for expert {expert} {name}; hooks not attached?")
        splits = tap.row_splits or tokens_per_expert
        start = sum(splits[:expert])
        rows = slice(start, start + tokens_per_expert[expert])  # drop quantization padding
        return tap.inputs[rows], self._grads(tap, name)[rows]

    @staticmethod
    def _grads(tap: LinearTap, name: str) -> torch.Tensor:
        if tap.output_grads is None:
            raise RuntimeError(
                f"STGC: {name} output gradient was not captured before the expert backward ended"
            )
        return tap.output_grads


def _output_tensor(output):
    return output[0] if isinstance(output, tuple) else output


def weight_grads_match_captures(config) -> bool:
    """Whether autograd's weight gradient of an expert linear is the G of the captured rows
    (sum_n D_n X_n^T in the captures' precision), so STGC may reuse it as the mean G.

    Not with gradient_accumulation_fusion (the linear adds dW into main_grad and hands
    autograd a placeholder), nor with FP8 / FP4 (Transformer Engine's linears form dW from
    quantized inputs and output gradients, while the per-token gradients STGC compares it
    with come from the unquantized captures: G must come from those same captures).
    """
    quantized = getattr(config, "fp8", None) or getattr(config, "fp4", None)
    return not (config.gradient_accumulation_fusion or quantized)


def attach_capture_hooks(
    experts: torch.nn.Module,
    current_capture: Callable[[], ExpertCapture | None],
    reuse_weight_grads: bool,
):
    """Register the capture hooks on the experts' linears; returns the hook handles.

    ``current_capture()`` returns the capture of the forward in progress (or None).
    reuse_weight_grads: also keep the weight gradient autograd computes for each
    expert linear (a tensor hook on the parameter), so that G need not be formed
    again. Only valid where ``weight_grads_match_captures`` holds.
    """
    in_backward = _BackwardCapture()
    handles = []
    for slot, name, module in iter_expert_linears(experts):

        def hook(mod, args, output, slot=slot, name=name):
            capture = current_capture()
            out = _output_tensor(output)
            if capture is None or not torch.is_grad_enabled() or not out.requires_grad:
                return
            tap = capture.tap(slot, name)
            tap.inputs = args[0].detach()
            if slot == -1 and len(args) > 1:
                tap.row_splits = [int(n) for n in args[1]]
            out.register_hook(in_backward.output_grad_hook(capture, tap))

        handles.append(module.register_forward_hook(hook))
        if reuse_weight_grads and slot != -1:
            handles.append(module.weight.register_hook(in_backward.param_hook(slot, name, "weight_grad")))
            if _trainable_bias(module) is not None:
                handles.append(module.bias.register_hook(in_backward.param_hook(slot, name, "bias_grad")))
    return handles


def _trainable_bias(module: torch.nn.Module):
    """The linear's bias parameter, or None (TE linears built without bias hold an empty
    tensor that does not require grad)."""
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.nn.Parameter) and bias.requires_grad and bias.numel() > 0:
        return bias
    return None


class _BackwardCapture:
    """Which capture the expert backward in progress belongs to (one at a time).

    Holds it weakly: once the expert side has closed and dropped a capture, nothing
    here keeps its tensors alive until the next backward.
    """

    def __init__(self):
        self._capture = lambda: None

    def output_grad_hook(self, capture: ExpertCapture, tap: LinearTap):
        def keep(grad):
            if capture.closed:
                return
            self._capture = weakref.ref(capture)
            tap.output_grads = grad.detach()

        return keep

    def param_hook(self, slot: int, name: str, attr: str):
        def keep(grad):
            capture = self._capture()
            if capture is not None and not capture.closed and (slot, name) in capture.taps:
                setattr(capture.taps[(slot, name)], attr, grad.detach())
                if capture.early_reduce is not None:
                    capture.early_reduce.start((slot, name, attr), grad)

        return keep


def iter_expert_linears(experts: torch.nn.Module):
    """(slot, linear_name, module): slot = local expert index, or -1 for grouped linears."""
    local_experts = getattr(experts, "local_experts", None)
    if local_experts is not None:  # SequentialMLP
        for slot, mlp in enumerate(local_experts):
            for name in LINEAR_NAMES:
                yield slot, name, getattr(mlp, name)
        return
    if all(hasattr(experts, name) for name in LINEAR_NAMES):  # TEGroupedMLP
        for name in LINEAR_NAMES:
            yield -1, name, getattr(experts, name)
        return
    raise NotImplementedError(
        f"STGC cannot attach to experts of type {type(experts).__name__}; "
        "supported: SequentialMLP (local spec) and TEGroupedMLP (TE spec, --moe-grouped-gemm)"
    )


def expert_linear_has_bias(experts: torch.nn.Module) -> dict[str, bool]:
    """{linear name: has a bias}. TE's grouped linear keeps one bias per expert (bias0, ...)."""
    biases = {}
    for _, name, module in iter_expert_linears(experts):
        bias = getattr(module, "bias", None)
        if bias is None:
            bias = getattr(module, "bias0", None)
        biases[name] = isinstance(bias, torch.Tensor) and bias.numel() > 0
    return biases
