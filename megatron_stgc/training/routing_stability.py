"""Routing-stability metrics per MoE layer and token group, logged with every record.

Logged names (group suffix: none = all real tokens, ``_text``, ``_image`` with a
vision-language model; N = megatron's 1-based layer number; ``routing/<name>`` is the mean
over the MoE layers that have the value):

  routing/layer{N}/load_tv[_g]     step-to-step total variation of the expert-load shares
                                   (routing_churn.load_share_tv), mean over the consecutive
                                   step pairs of the record's steps (the first pair links to
                                   the previous record's last step)
  routing/layer{N}/topk_change[_g] fraction of the probe batch's tokens whose top-k expert
                                   set changed since the previous probe (routing_probe.py)
  routing/layer{N}/entropy[_g]     mean entropy (nats) of the routing probabilities
                                   softmax(z) on the probe batch

The load shares come from the expert-load counter's running sums, snapshotted after every
step on the device (no host sync in the step); the snapshots of a record's steps are
all-reduced once, on the log step. The probe runs at the start of training and then on a
log step once ``--routing-probe-interval`` steps have passed since the last probe (0 = no
probe): a record without a probe has no topk_change / entropy keys.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_stgc import parallel
from megatron_stgc.model.modality import MODALITY_NAMES
from megatron_stgc.training import metrics, routing_churn
from megatron_stgc.training.expert_load import MODALITY_CODES, ExpertLoadCounter
from megatron_stgc.training.routing_probe import RoutingProbe

METRIC_SOURCE = "routing"
GROUP_SUFFIXES = ("",) + tuple(f"_{MODALITY_NAMES[code]}" for code in MODALITY_CODES)


def _summed_over_ranks(table: torch.Tensor) -> torch.Tensor:
    """``table`` summed over all ranks (each routes its own tokens), as float64 on the CPU."""
    table = table.to(parallel.collective_device(), torch.float64)
    if dist.is_initialized():
        dist.all_reduce(table)
    return table.cpu()


def _named(layers: list[int], name: str, numerator: torch.Tensor,
           denominator: torch.Tensor) -> dict[str, float]:
    """routing/layer{N}/{name}{suffix} = num / den where den > 0, and the layer means.

    numerator, denominator: [layers, groups]."""
    values: dict[str, float] = {}
    per_group: dict[str, list[float]] = {}
    for row, layer in enumerate(layers):
        for group in range(numerator.shape[1]):
            if denominator[row, group] <= 0:
                continue
            key = f"{name}{GROUP_SUFFIXES[group]}"
            value = float(numerator[row, group] / denominator[row, group])
            values[f"routing/layer{layer}/{key}"] = value
            per_group.setdefault(key, []).append(value)
    values.update({f"routing/{key}": sum(found) / len(found)
                   for key, found in per_group.items()})
    return values


class RoutingStability:
    """Snapshots of each step's expert loads, the probe, and the metric source."""

    def __init__(self, expert_load: ExpertLoadCounter, probe: Optional[RoutingProbe] = None,
                 probe_interval: int = 0):
        self.expert_load = expert_load
        self.probe = probe
        self.probe_interval = probe_interval
        self.snapshots: list[dict[int, torch.Tensor]] = []  # per step: running sums
        self.last_step: Optional[tuple[list[int], torch.Tensor]] = None  # layers, [1, L, G, E]
        self.steps_since_probe = 0

    def start(self) -> None:
        """Before the first step (of this process): the probe's reference routing (its
        entropy is not logged; the first record's probe compares with it)."""
        if self.probe is not None:
            self.probe.run()

    def end_step(self) -> None:
        """After each step: keep the loads counted so far (device tensors, no host sync)."""
        self.snapshots.append(self.expert_load.running_rows())
        self.steps_since_probe += 1

    def collect(self) -> dict[str, float]:
        """The record's routing metrics; collective (every rank, on log steps)."""
        values = self._load_churn()
        if self.probe is not None and self.steps_since_probe >= self.probe_interval:
            values.update(self._probe_metrics(self.probe.run()))
            self.steps_since_probe = 0
        return values

    def _load_churn(self) -> dict[str, float]:
        snapshots, self.snapshots = self.snapshots, []
        if not snapshots or not snapshots[-1]:
            return {}
        layers = sorted(snapshots[-1])
        empty = torch.zeros_like(snapshots[-1][layers[0]])
        stacked = torch.stack([torch.stack([snapshot.get(layer, empty) for layer in layers])
                               for snapshot in snapshots])  # [steps, L, G, E] running sums
        steps = routing_churn.per_step_counts(_summed_over_ranks(stacked))
        if self.last_step is not None and self.last_step[0] == layers \
                and self.last_step[1].shape[1:] == steps.shape[1:]:
            steps = torch.cat([self.last_step[1], steps])
        self.last_step = (layers, steps[-1:].clone())
        tv_sum, pairs = routing_churn.load_share_tv(steps)  # [L, G]
        return _named(layers, "load_tv", tv_sum, pairs)

    def _probe_metrics(self, sums: torch.Tensor) -> dict[str, float]:
        table = _summed_over_ranks(sums)  # [L, G, (changed, compared, entropy, tokens)]
        layers = self.probe.layers
        values = _named(layers, "topk_change", table[..., 0], table[..., 1])
        values.update(_named(layers, "entropy", table[..., 2], table[..., 3]))
        return values


def probe_batches(dataset, config) -> list[dict]:
    """This rank's micro-batches of the run's first step (made once; not counted as use;
    the bad records found while making them are counted)."""
    from megatron.core import parallel_state

    from megatron_stgc.data.loader import MicroBatchPositions

    t = config.training
    positions = MicroBatchPositions(t.global_batch_size, t.micro_batch_size,
                                    parallel_state.get_data_parallel_rank(),
                                    parallel_state.get_data_parallel_world_size())
    return [_probe_batch(dataset, positions(k)) for k in range(positions.per_step)]


def _probe_batch(dataset, positions: list[int]) -> dict:
    """One probe micro-batch. Bad records it finds are counted now (once per process, as in
    training): the dataset skips a record it knows to be bad without reporting it again, so
    findings dropped here would never be counted. Truncations count per use: not here."""
    if not hasattr(dataset, "produce"):
        return dataset.batch(positions)
    from dataclasses import replace

    tensors, events = dataset.produce(positions)
    dataset.absorb(replace(events, truncated=0))
    return tensors


def start_routing_stability(config, objects, expert_load: ExpertLoadCounter,
                            dataset) -> Optional[RoutingStability]:
    """Register the ``routing`` metric source for a MoE model (None for a dense one) and run
    the start-of-run probe."""
    from megatron_stgc.training.routing_probe import moe_routers

    model = objects.unwrapped_model
    if not moe_routers(model):
        return None
    interval = config.logging.routing_probe_interval
    probe = None
    if interval > 0:
        probe = RoutingProbe(objects.model, model, probe_batches(dataset, config), expert_load)
    stability = RoutingStability(expert_load, probe, interval)
    stability.start()
    metrics.register_metric_source(METRIC_SOURCE, stability.collect)
    return stability


def stop_routing_stability() -> None:
    metrics.unregister_metric_source(METRIC_SOURCE)
