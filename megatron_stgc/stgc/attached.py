"""Find the STGC layers of a model and switch their per-step options."""

from __future__ import annotations

from typing import Iterator

from megatron_stgc.stgc.layer import STGCMoELayer


def stgc_layers(model) -> Iterator[STGCMoELayer]:
    """Every STGCMoELayer in a module or a list of model chunks."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, STGCMoELayer):
                yield module


def set_consistency_collection(model, enabled: bool) -> None:
    """Compute gradient consistency (one extra GEMM per expert linear) in the next backwards."""
    for layer in stgc_layers(model):
        layer.stgc.collect_consistency = enabled
