"""Where the training loop meets LTDR: its metric source (the routing itself is in the spec)."""

from __future__ import annotations

from megatron_stgc.config import RunConfig
from megatron_stgc.ltdr.metrics import collect_ltdr_metrics
from megatron_stgc.parallel import collective_device
from megatron_stgc.training import metrics

METRIC_SOURCE = "ltdr"


def register_ltdr_metrics(config: RunConfig, objects) -> None:
    """Log ltdr/* metrics every step (reduced over all ranks) when LTDR is on."""
    if config.ltdr.enabled:
        metrics.register_metric_source(
            METRIC_SOURCE,
            lambda: collect_ltdr_metrics(objects.model, config.model.num_layers,
                                         device=collective_device()),
        )


def unregister_ltdr_metrics() -> None:
    metrics.unregister_metric_source(METRIC_SOURCE)
