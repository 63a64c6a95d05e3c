"""Where the training loop meets STGC: the step function and the metric source."""

from __future__ import annotations

from megatron_stgc.config import RunConfig
from megatron_stgc.parallel import collective_device
from megatron_stgc.stgc.metrics import collect_stgc_metrics
from megatron_stgc.stgc.attached import set_consistency_collection, stgc_layers
from megatron_stgc.stgc.mean_audit import MeanAudit, collect_audit_metrics
from megatron_stgc.stgc.two_pass import two_pass_train_step
from megatron_stgc.training import metrics
from megatron_stgc.training.setup import TrainingObjects
from megatron_stgc.training.step import StepResult, train_step

METRIC_SOURCE = "stgc"
AUDIT_SOURCE = "stgc_audit"


def run_train_step(config: RunConfig, objects: TrainingObjects, batches, num_microbatches: int,
                   iteration: int) -> StepResult:
    """One optimizer step: plain train_step, or the two-pass recipe with --stgc-mode two-pass.

    iteration: the step about to run (0-based); gradient consistency is computed on
    steps where (iteration + 1) % --stgc-consistency-interval == 0.
    """
    kwargs = dict(optimizer=objects.optimizer, scheduler=objects.scheduler,
                  micro_batch_size=config.training.micro_batch_size,
                  seq_length=config.model.seq_length)
    stgc = config.stgc
    if not stgc.enabled:
        return train_step(objects.model, data_iterator=batches,
                          num_microbatches=num_microbatches, **kwargs)
    interval = stgc.consistency_interval
    set_consistency_collection(objects.model, bool(interval) and (iteration + 1) % interval == 0)
    if stgc.mode == "two-pass":
        result = two_pass_train_step(train_step, objects.model, batches, num_microbatches,
                                     **kwargs)
    else:
        result = train_step(objects.model, data_iterator=batches,
                            num_microbatches=num_microbatches, **kwargs)
    after_stgc_step(objects.model, result.update_successful)
    return result


def after_stgc_step(model, update_successful: bool) -> None:
    """Once a step's gradients are reduced: keep them for --stgc-mean-source previous-step
    (dropped after a skipped update), and judge the step for --stgc-mean-audit."""
    for layer in stgc_layers(model):
        if layer.stgc.config.mean_source == "previous-step":
            if update_successful:
                layer.remember_step_grads()
            else:
                layer.stgc.previous_step_grads = None
        if layer.stgc.audit is not None:
            layer.stgc.audit.finish_step(layer.expert_dp_group)


def register_stgc_metrics(config: RunConfig, objects: TrainingObjects) -> None:
    """Log stgc/* metrics every step (reduced over all ranks) when STGC is on, and
    stgc/audit/* with --stgc-mean-audit."""
    if not config.stgc.enabled:
        return
    metrics.register_metric_source(
        METRIC_SOURCE,
        lambda: collect_stgc_metrics(objects.model, config.model.num_layers,
                                     device=collective_device()),
    )
    if config.stgc.mean_audit:
        audits = start_mean_audit(objects.model)
        metrics.register_metric_source(
            AUDIT_SOURCE, lambda: collect_audit_metrics(audits, device=collective_device()))


def start_mean_audit(model) -> list[MeanAudit]:
    """Give every STGC layer a MeanAudit (judged after each step by after_stgc_step)."""
    audits = []
    for layer in stgc_layers(model):
        layer.stgc.audit = MeanAudit(tau=layer.stgc.config.tau)
        audits.append(layer.stgc.audit)
    return audits


def unregister_stgc_metrics() -> None:
    metrics.unregister_metric_source(METRIC_SOURCE)
    metrics.unregister_metric_source(AUDIT_SOURCE)
