"""What the plug-ins (STGC, LTDR, the Gumbel second expert) share to sit on a megatron-core
model: finding their modules, rewriting every MoE layer spec of a block, and the running
metric sums a module keeps between log steps without a host sync."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Callable, Iterator, Optional

import torch


def modules_of_type(model, cls: type) -> Iterator[torch.nn.Module]:
    """Every module of type ``cls`` in a module or a list of model chunks, in order."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, cls):
                yield module


def map_moe_layer_specs(block_spec, moe_spec: Callable[[object], Optional[object]],
                        nothing_attached: Exception):
    """A copy of a TransformerBlockSubmodules whose MLP specs are ``moe_spec(mlp_spec)`` where
    that is not None (a MoE layer); raises ``nothing_attached`` when it is None everywhere."""
    from megatron_stgc.stgc.spec import layer_mlp_spec

    block_spec = copy.copy(block_spec)
    new_specs, attached = [], 0
    for layer_spec in block_spec.layer_specs:
        mlp = moe_spec(layer_mlp_spec(layer_spec))
        if mlp is not None:
            layer_spec = replace(layer_spec, submodules=replace(layer_spec.submodules, mlp=mlp))
            attached += 1
        new_specs.append(layer_spec)
    if not attached:
        raise nothing_attached
    block_spec.layer_specs = new_specs
    return block_spec


class RunningSums:
    """Named running sums since the last ``take``, float64 on the device they were computed
    on: adding never copies to the host (no sync in forward or backward)."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self.values: torch.Tensor | None = None  # [len(names)] float64

    def add(self, **named: torch.Tensor) -> None:
        """Add 0-d (or one-element) tensors to the sums of their names; the others stay."""
        device = next(iter(named.values())).device
        if self.values is None:
            self.values = torch.zeros(len(self.names), dtype=torch.float64, device=device)
        for name, value in named.items():
            index = self.names.index(name)
            self.values[index] += value.detach().reshape(()).to(self.values.device,
                                                                torch.float64)

    def take(self, device) -> torch.Tensor:
        """The sums as a [len(names)] float64 tensor on ``device`` (zeros if nothing was
        added), then reset."""
        values = self.values
        self.values = None
        if values is None:
            return torch.zeros(len(self.names), dtype=torch.float64, device=device)
        return values.to(device)
