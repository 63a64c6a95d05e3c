"""A registry of per-step metric sources for the step logger.

A source is a function ``() -> dict[str, float]`` called once per logged
step on EVERY rank, after the optimizer step (so it may run collectives; all
ranks call sources in registration order). Rank 0's values go to the JSONL
log, the progress line (only names given in ``progress_keys``) and
TensorBoard. Example::

    from megatron_stgc.training import metrics
    metrics.register_metric_source("stgc", lambda: {"stgc/conflict_fraction": 0.07})
"""

from __future__ import annotations

from typing import Callable

MetricSource = Callable[[], dict[str, float]]

_SOURCES: dict[str, MetricSource] = {}


def register_metric_source(name: str, source: MetricSource) -> None:
    """Add (or replace) the source called ``name``."""
    if not callable(source):
        raise TypeError(f"metric source {name!r} must be callable")
    _SOURCES[name] = source


def unregister_metric_source(name: str) -> None:
    _SOURCES.pop(name, None)


def registered_metric_sources() -> list[str]:
    return list(_SOURCES)


def collect_registered_metrics() -> dict[str, float]:
    """Call every source; a key returned by two sources is an error (no silent overwrite)."""
    values: dict[str, float] = {}
    for name, source in _SOURCES.items():
        produced = source()
        if not isinstance(produced, dict):
            raise TypeError(f"metric source {name!r} returned {type(produced).__name__}, "
                            "expected dict[str, float]")
        for key, value in produced.items():
            if key in values:
                raise KeyError(f"metric {key!r} produced by source {name!r} and another source")
            values[key] = float(value)
    return values
