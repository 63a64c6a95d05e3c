"""Padding is not counted: adding padding columns to a micro-batch changes nothing (issue 20).

The tiny MoE-LLaVA (2 MoE layers, aux loss 0.01, STGC; with the z-loss or with LTDR) runs
megatron-core's schedule with our forward step on one micro-batch laid out two ways: cut to
its longest sample, and widened with padding to --seq-length (the layout before issue 20).
Both must give the same LM loss, balancing / z / STGC losses, gradients (DDP's reduced main
grads), routing of every real token, STGC cosines and flags of every real (token, expert)
pair, expert loads in total and per modality, and STGC / LTDR metrics (1e-6). In one
process and at EP 2 on two gloo ranks (alltoall and allgather dispatchers), each rank with
its own micro-batch. Without the padding mask the same comparison fails (the padding enters
the balancing loss): the check is sharp.
"""

from __future__ import annotations

import math

import pytest
import torch

from dist_utils import named_global_tensors, run_on_ranks
from llava_batches import IMAGE_ID, SEQ, VOCAB, layout, llava_config, real_token_rows, \
    synthetic_samples, widen

SAMPLES = 4
LONGEST = SEQ - 12  # ids of the longest sample: the cut layout is narrower than SEQ

STGC_Z = dict(stgc=True, stgc_tau=0.2, z_loss=1e-3)
STGC_LTDR = dict(stgc=True, stgc_tau=0.2, ltdr=True)


def _build(variant: dict, expert_parallel: int, dispatcher: str):
    from megatron_stgc.training.setup import build_model_and_optimizer
    from megatron_stgc.training.train import seed_everything

    flags = {k: v for k, v in variant.items() if k != "z_loss"}
    config = llava_config(expert_model_parallel_size=expert_parallel,
                          moe_token_dispatcher_type=dispatcher,
                          global_batch_size=4 * (2 if expert_parallel == 2 else 1), **flags)
    seed_everything(config.training.seed)
    objects = build_model_and_optimizer(config, VOCAB, IMAGE_ID)
    if "z_loss" in variant:  # not a RunConfig flag; megatron's routers read it per forward
        objects.transformer_config.moe_z_loss_coeff = variant["z_loss"]
    return config, objects


def _pairs(layer, index: torch.Tensor) -> dict[str, torch.Tensor]:
    last = layer.stgc.last
    return {"routing": last.routing_map[index].clone(), "cos": last.cos[index].clone(),
            "conflicts": last.conflicts[index].clone()}


def _one_layout(config, objects, counter, batch) -> dict:
    """Forward + backward of one micro-batch through megatron's schedule; what it produced."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_stgc.ltdr.metrics import collect_ltdr_metrics
    from megatron_stgc.mcore_compat import report_moe_metrics
    from megatron_stgc.stgc.attached import stgc_layers
    from megatron_stgc.training.forward import gpt_forward_step

    for chunk in objects.model:
        chunk.zero_grad_buffer()
    losses = get_forward_backward_func()(
        forward_step_func=gpt_forward_step, data_iterator=iter([batch]), model=objects.model,
        num_microbatches=1, seq_length=SEQ, micro_batch_size=config.training.micro_batch_size,
        forward_only=False)
    index = torch.cat(real_token_rows(batch, SAMPLES))
    layers = sorted(stgc_layers(objects.model), key=lambda layer: layer.layer_number)
    num_layers = config.model.num_layers
    lm = losses[0]["lm_loss"]
    return {
        "lm_loss": float(lm[0] / lm[1]),
        "moe": report_moe_metrics(1.0, num_layers, config.model.moe_layer_freq),
        "grads": named_global_tensors(objects.model[0], "grad"),
        "pairs": [_pairs(layer, index) for layer in layers],
        "loads": counter.collect(),
        "loads_by_modality": counter.collect_by_modality(),
        "stgc": _stgc_metrics(objects, num_layers),
        "ltdr": collect_ltdr_metrics(objects.model, num_layers, device=torch.device("cpu")),
    }


def _stgc_metrics(objects, num_layers):
    from megatron_stgc.stgc.metrics import collect_stgc_metrics

    return collect_stgc_metrics(objects.model, num_layers, device=torch.device("cpu"))


def _padding_runs(rank, world_size, variants, keep_padding_mask=True):
    """Per variant (variant, dispatcher): (cut layout's results, padded layout's results)."""
    from megatron.core import parallel_state

    from megatron_stgc import parallel
    from megatron_stgc.training.expert_load import ExpertLoadCounter

    expert_parallel = world_size
    parallel.initialize_model_parallel(1, expert_parallel, seed=1234)
    samples, images, has_image = synthetic_samples(
        SAMPLES, seed=20 + parallel_state.get_data_parallel_rank(), max_ids=LONGEST)
    cut = layout(samples, images, has_image)
    padded = widen(cut, SEQ)
    assert cut["tokens"].shape[1] < padded["tokens"].shape[1] == SEQ
    if not keep_padding_mask:  # the forward as before issue 20: megatron is not told
        cut, padded = ({k: v for k, v in b.items() if k != "padding_mask"} for b in (cut, padded))
    results = []
    for variant, dispatcher in variants:
        config, objects = _build(variant, expert_parallel, dispatcher)
        counter = ExpertLoadCounter(objects.unwrapped_model)
        results.append([_one_layout(config, objects, counter, batch) for batch in (cut, padded)])
        counter.remove()
    return results


def _close(a, b, what: str, atol: float = 1e-6) -> None:
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64),
                               torch.as_tensor(b, dtype=torch.float64), rtol=1e-6, atol=atol,
                               equal_nan=True, msg=what)


def _assert_same(cut: dict, padded: dict) -> None:
    _close(cut["lm_loss"], padded["lm_loss"], "lm loss")
    assert set(cut["moe"]) == set(padded["moe"])
    for name in cut["moe"]:
        _close(cut["moe"][name], padded["moe"][name], f"moe/{name}")
    for name, grad in cut["grads"].items():
        _close(grad, padded["grads"][name], f"gradient of {name}")
    for layer, (a, b) in enumerate(zip(cut["pairs"], padded["pairs"])):
        assert torch.equal(a["routing"], b["routing"]), f"layer {layer}: routing of real tokens"
        _close(a["cos"], b["cos"], f"layer {layer}: STGC cosines")
        clear = ~torch.isnan(a["cos"]) & ((a["cos"] - 0.2).abs() > 1e-5)  # not on tau's edge
        assert torch.equal(a["conflicts"][clear], b["conflicts"][clear]), f"layer {layer} flags"
    assert cut["loads"] == padded["loads"]
    assert cut["loads_by_modality"] == padded["loads_by_modality"]
    for metrics in ("stgc", "ltdr"):
        assert set(cut[metrics]) == set(padded[metrics]), metrics
        for name in cut[metrics]:
            _close(cut[metrics][name], padded[metrics][name], name)


def _check_nontrivial(results: dict) -> None:
    """The runs judged pairs, flagged some, balanced and routed images (not vacuous)."""
    assert results["moe"]["load_balancing_loss"] > 0
    assert any(bool(p["conflicts"].any()) for p in results["pairs"])
    assert any(bool((~torch.isnan(p["cos"])).any()) for p in results["pairs"])
    assert all(sum(v["image"]) > 0 for v in results["loads_by_modality"].values())


@pytest.fixture(scope="module")
def one_process():
    return run_on_ranks(_padding_runs, 1, [(STGC_Z, "alltoall"), (STGC_LTDR, "alltoall")])[0]


def test_padding_changes_nothing_with_stgc_and_z_loss(one_process):
    cut, padded = one_process[0]
    _check_nontrivial(cut)
    assert cut["moe"]["z_loss"] > 0
    _assert_same(cut, padded)


def test_padding_changes_nothing_with_stgc_and_ltdr(one_process):
    cut, padded = one_process[1]
    _check_nontrivial(cut)
    assert cut["ltdr"]["ltdr/tail_fraction"] > 0 and not math.isnan(
        cut["ltdr"]["ltdr/text_balance_loss"])
    _assert_same(cut, padded)


def test_padding_changes_nothing_at_ep2_on_both_dispatchers():
    """Two gloo ranks, EP 2: each rank's micro-batch, padded or not, same everything."""
    variants = [(STGC_Z, "alltoall"), (STGC_Z, "allgather"), (STGC_LTDR, "alltoall")]
    per_rank = run_on_ranks(_padding_runs, 2, variants)
    for rank, results in enumerate(per_rank):
        for (variant, dispatcher), (cut, padded) in zip(variants, results):
            _check_nontrivial(cut)
            _assert_same(cut, padded)


def test_without_the_padding_mask_padding_is_counted():
    """The forward before issue 20 (no padding_mask): the padded layout's balancing loss,
    loads and gradients differ, so the comparison above would fail."""
    cut, padded = run_on_ranks(_padding_runs, 1, [(STGC_Z, "alltoall")], False)[0][0]
    with pytest.raises(AssertionError):
        _assert_same(cut, padded)
    assert sum(sum(v) for v in padded["loads"].values()) > sum(
        sum(v) for v in cut["loads"].values())
