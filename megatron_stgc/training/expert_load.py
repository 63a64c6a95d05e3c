"""Tokens routed to each expert, per MoE layer, counted by forward hooks on the routers.

With a vision-language model the counts are also split by the modality of the
routed token (text / image; padding excluded), the paper's Fig. 4 statistic:
the model's ``ModalityContext`` says which of the router's tokens are which.
Padding positions are not counted in the totals either: megatron-core still dispatches
them to experts, but the router's ``padding_mask`` argument (what the model passed to
GPTModel) marks them, and the hook drops those rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_stgc.mcore_compat import router_padding_mask
from megatron_stgc.model.modality import MODALITY_NAMES


MODALITY_CODES = sorted(MODALITY_NAMES)


def _accumulate(store: dict[int, torch.Tensor], layer: int, value: torch.Tensor) -> None:
    """Add ``value`` to ``store[layer]``; counts stay on the router's device (no host sync in
    the forward), they move for the reduction in ``collect``."""
    store[layer] = value if layer not in store else store[layer] + value


def _summed_over_ranks(rows: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack(rows) summed over all ranks, on the CPU (collective)."""
    from megatron_stgc.parallel import collective_device

    stacked = torch.stack(rows).to(collective_device())
    if dist.is_initialized():
        dist.all_reduce(stacked)
    return stacked.cpu()


def _without_padding(routing_map: torch.Tensor, padding_mask) -> torch.Tensor:
    """routing_map [tokens, experts] with the padding rows (padding_mask [tokens...], True =
    padding, megatron's router order) cleared; no host sync."""
    if padding_mask is None:
        return routing_map
    real = ~padding_mask.reshape(-1, 1).to(device=routing_map.device, dtype=torch.bool)
    return routing_map.reshape(-1, routing_map.shape[-1]) & real


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
        self.modality_counts: dict[int, torch.Tensor] = {}  # [modalities, experts]
        self.modality_context = getattr(model, "modality", None)
        self.paused = False  # True: forwards are not counted (training/routing_probe.py)
        self.handles = []
        for module in model.modules():
            if isinstance(module, TopKRouter):
                layer = module.layer_number
                self.handles.append(module.register_forward_hook(self._hook(layer),
                                                                 with_kwargs=True))

    def _hook(self, layer: int):
        def count(module, args, kwargs, output):
            if _inside_backward() or self.paused:
                return
            routing_map = _without_padding(output[1], router_padding_mask(args, kwargs))
            per_expert = routing_map.reshape(-1, routing_map.shape[-1]).sum(dim=0).detach()
            _accumulate(self.counts, layer, per_expert.to(torch.long))
            if self.by_modality and self.modality_context.current is not None:
                self._count_by_modality(layer, routing_map, self.modality_context.current)

        return count

    @property
    def by_modality(self) -> bool:
        return self.modality_context is not None

    def _count_by_modality(self, layer: int, routing_map: torch.Tensor,
                           modality: torch.Tensor) -> None:
        """routing_map: [tokens, experts] bool; modality: [tokens] (megatron's s*b order).

        One matmul of the modality one-hot [tokens, modalities] with the routing map, in
        float64 (exact counts; integer matmul is not on the GPU), no boolean indexing and
        no host data copied to the device (no host sync; tests/test_host_copies.py)."""
        routed = routing_map.reshape(-1, routing_map.shape[-1]).to(torch.float64)
        modality = modality.to(routed.device).reshape(-1)
        one_hot = torch.stack([modality == code for code in MODALITY_CODES],
                              dim=1).to(torch.float64)  # [tokens, modalities]
        rows = (one_hot.t() @ routed).round().to(torch.long)  # [modalities, experts]
        _accumulate(self.modality_counts, layer, rows)

    def groups(self) -> int:
        """Rows of ``running_rows``: all tokens, then one per modality (with a modality mask)."""
        return 1 + (len(MODALITY_CODES) if self.by_modality else 0)

    def running_rows(self) -> dict[int, torch.Tensor]:
        """{layer: [groups, experts] long} counted since the last collect, on the routers'
        device (no host sync): row 0 all tokens, then MODALITY_CODES' rows. The stored sums
        are never changed in place, so a caller may keep what it gets as a snapshot."""
        rows = {}
        for layer, total in self.counts.items():
            parts = [total.reshape(1, -1)]
            if self.by_modality:
                parts.append(self.modality_counts.get(
                    layer, torch.zeros(len(MODALITY_CODES), total.numel(), dtype=total.dtype,
                                       device=total.device)))
            rows[layer] = torch.cat(parts)
        return rows

    def collect(self) -> dict[str, list[int]]:
        """{"layer_<n>": [tokens per expert]} summed over ranks since the last collect."""
        layers = sorted(self.counts)
        if not layers:
            return {}
        stacked = _summed_over_ranks([self.counts[layer] for layer in layers])
        self.counts = {}
        return {f"layer_{layer}": row.tolist() for layer, row in zip(layers, stacked)}

    def collect_by_modality(self) -> dict[str, dict[str, list[int]]]:
        """{"layer_<n>": {"text": [...], "image": [...]}} summed over ranks; collective."""
        layers = sorted(self.modality_counts)
        if not layers:
            return {}
        stacked = _summed_over_ranks([self.modality_counts[layer] for layer in layers])
        self.modality_counts = {}
        names = [MODALITY_NAMES[code] for code in MODALITY_CODES]
        return {f"layer_{layer}": {name: row.tolist() for name, row in zip(names, per_layer)}
                for layer, per_layer in zip(layers, stacked)}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
