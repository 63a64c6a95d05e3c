"""Find the STGC layers of a model and switch their per-step options."""

from __future__ import annotations

from typing import Iterator

from megatron_stgc.plugin import modules_of_type
from megatron_stgc.stgc.layer import STGCMoELayer


def stgc_layers(model) -> Iterator[STGCMoELayer]:
    """Every STGCMoELayer in a module or a list of model chunks."""
    return modules_of_type(model, STGCMoELayer)


def set_consistency_collection(model, enabled: bool) -> None:
    """Compute gradient consistency (one extra GEMM per expert linear) in the next backwards."""
    for layer in stgc_layers(model):
        layer.stgc.collect_consistency = enabled
