"""Tokens routed to each expert, per MoE layer, counted by forward hooks on the routers."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _inside_backward() -> bool:
    # Activation recompute re-runs router forwards inside the backward pass;
    # those must not be counted twice.
    return torch._C._current_graph_task_id() != -1


class ExpertLoadCounter:
    """Counts (token, expert) assignments of every router on this rank.

    ``collect()`` sums the counts over all ranks (each rank routes its own
    tokens) and resets them; it is collective.
    """

    def __init__(self, model: torch.nn.Module):
        from megatron.core.transformer.moe.router import TopKRouter

        self.counts: dict[int, torch.Tensor] = {}
        self.handles = []
        for module in model.modules():
            if isinstance(module, TopKRouter):
                layer = module.layer_number
                self.handles.append(module.register_forward_hook(self._hook(layer)))

    def _hook(self, layer: int):
        def count(module, inputs, output):
            if _inside_backward():
                return
            routing_map = output[1]
            per_expert = routing_map.reshape(-1, routing_map.shape[-1]).sum(dim=0).detach()
            if layer in self.counts:
                self.counts[layer] += per_expert.to(torch.long)
            else:
                self.counts[layer] = per_expert.to(torch.long).cpu()

        return count

    def collect(self) -> dict[str, list[int]]:
        """{"layer_<n>": [tokens per expert]} summed over ranks since the last collect."""
        layers = sorted(self.counts)
        if not layers:
            return {}
        stacked = torch.stack([self.counts[layer] for layer in layers])
        if dist.is_initialized():
            dist.all_reduce(stacked)
        self.counts = {}
        return {f"layer_{layer}": row.tolist() for layer, row in zip(layers, stacked)}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
