"""No host-to-device copy in the hot paths of STGC, LTDR and the expert-load counter.

On a GPU a copy of host data to the device (``cpu_tensor.to(cuda)``, ``torch.tensor(data,
device=cuda)``) from pageable memory makes the host wait for the stream: a host sync per
MoE layer per micro-batch. CI has no GPU, so the layers run on the device stand-in of
``megatron_stgc.analysis.host_copies`` (CPU data, a device of its own), which records every
host-to-device transfer with the frame that asked for it. Each path runs one warm-up step
(what is built once may be copied then), then one recorded forward and backward; no frame
of this package may transfer. Real megatron-core layers, real gloo ranks (2): expert-DP 2
(EP 1) for every estimator and mean source, EP 2 for the return routes and LTDR's reduce.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from dist_utils import run_on_ranks
from megatron_stgc.analysis.host_copies import DeviceStandIn, OnDevice
from megatron_stgc.ltdr.attached import attach_modality
from megatron_stgc.ltdr.config import LTDRConfig
from megatron_stgc.ltdr.dispatch import prepare_ltdr_layers
from megatron_stgc.ltdr.spec import ltdr_moe_spec
from megatron_stgc.mcore_compat import build_moe_layer
from megatron_stgc.model.modality import IMAGE, PAD, TEXT, ModalityContext
from megatron_stgc.stgc.spec import stgc_moe_spec
from megatron_stgc.stgc.two_pass import two_pass_forward_backward
from megatron_stgc.training.expert_load import MODALITY_CODES, ExpertLoadCounter
from megatron_stgc.stgc.router import TRACKER_NAME
from stgc_utils import (STGCConfig, build_stgc_layer, forget_tracked_moe_metric,
                        init_single_process, moe_config)

SEQ, BATCH, HIDDEN = 32, 2, 16  # per rank

# path -> (expert-parallel size, STGCConfig fields or None, LTDR on, dispatcher, two-pass)
PATHS = {
    f"{estimator} {source}": (1, dict(estimator=estimator, mean_source=source), False,
                              "alltoall", False)
    for estimator in ("exact", "lowrank", "fc2")
    for source in ("micro-batch", "micro-batch-bf16", "local", "previous-step")
}
PATHS.update({
    "exact micro-batch, reduce not overlapped": (1, dict(overlap_mean_reduce=False), False,
                                                 "alltoall", False),
    "two-pass": (1, {}, False, "alltoall", True),
    "EP 2 alltoall": (2, {}, False, "alltoall", False),
    "EP 2 allgather": (2, {}, False, "allgather", False),
    "LTDR, EP 2": (2, None, True, "alltoall", False),
    "STGC + LTDR, EP 2": (2, {}, True, "alltoall", False),
    "STGC + LTDR, expert-DP 2, allgather": (1, {}, True, "allgather", False),
})


class _Model(torch.nn.Module):
    """What the VLM hands the routers and the counter: the layer and the token modality."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.modality = ModalityContext()


def _batch(rank: int, step: int):
    gen = torch.Generator().manual_seed(100 * rank + step)
    hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)
    weights = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)
    modality = torch.full((BATCH, SEQ), TEXT)
    modality[:, 2:14] = IMAGE
    modality[0, -3:] = PAD
    return hidden, weights, modality


def _build(stand_in: DeviceStandIn, path: str):
    _, stgc_fields, with_ltdr, dispatcher, _ = PATHS[path]
    config = moe_config(gated_linear_unit=True, use_cpu_initialization=False,
                        moe_token_dispatcher_type=dispatcher)
    spec = get_moe_module_spec(use_te=False, num_experts=config.num_moe_experts)
    if stgc_fields is not None:
        spec = stgc_moe_spec(spec, STGCConfig(enabled=True, estimator_rank=4, **stgc_fields))
    if with_ltdr:
        spec = ltdr_moe_spec(spec, LTDRConfig(enabled=True))
    model_parallel_cuda_manual_seed(1234)
    layer = build_moe_layer(spec, config, layer_number=1)
    prepare_ltdr_layers(layer)
    model = _Model(stand_in.move_module(layer.train()))
    attach_modality(model, model.modality)
    if stgc_fields is not None:
        layer.stgc.collect_consistency = True
    return model, layer, ExpertLoadCounter(model)


def _step(stand_in, model, layer, path: str, rank: int, step: int) -> None:
    hidden, weights, modality = (stand_in.to_device(t) for t in _batch(rank, step))
    stgc_fields, two_pass = PATHS[path][1], PATHS[path][4]

    def forward_backward():
        model.modality.set(modality)
        out, _ = layer(hidden)
        (out * weights).sum().backward()

    if two_pass:
        def zero_grads():
            for param in layer.parameters():
                param.grad = None

        two_pass_forward_backward(layer, forward_backward, zero_grads)
    else:
        forward_backward()
    if stgc_fields is not None and layer.stgc.config.mean_source == "previous-step":
        layer.remember_step_grads()


def _watch(rank: int, path: str) -> dict:
    """Warm-up step, then one recorded step of ``path`` on the stand-in."""
    with DeviceStandIn() as stand_in:
        model, layer, counter = _build(stand_in, path)
        for step in range(2):
            with stand_in.recording() if step else contextlib.nullcontext():
                _step(stand_in, model, layer, path, rank, step)
        stgc = getattr(layer, "stgc", None)
        counted = sum(sum(row) for row in counter.collect().values())
    return {"ours": [str(t) for t in stand_in.ours()],
            "megatron": [str(t) for t in stand_in.transfers if not t.ours],
            "overlapped": None if stgc is None else stgc.overlapped_backwards,
            "judged": None if stgc is None else int((~torch.isnan(stgc.last.cos.inner)).sum()),
            "tail": None if not PATHS[path][2] else int(layer.router.ltdr_last.tail.inner.sum()),
            "counted": counted}


def _watch_every_path(rank: int, world: int) -> dict:
    warnings.filterwarnings("ignore")  # megatron's RNG tracker warns about CPU init
    results = {}
    for path, fields in PATHS.items():
        parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=fields[0])
        results[path] = _watch(rank, path)
        parallel_state.destroy_model_parallel()
    return results


@pytest.fixture(scope="module")
def watched():
    return run_on_ranks(_watch_every_path, 2)


@pytest.mark.parametrize("path", list(PATHS))
def test_no_host_to_device_copy(watched, path):
    for rank, results in enumerate(watched):
        result = results[path]
        assert result["ours"] == [], f"rank {rank}, {path}: " + "; ".join(result["ours"])
        assert result["megatron"] == [], f"rank {rank}, {path}: " + "; ".join(result["megatron"])
        assert result["counted"] > 0, "the expert-load counter counted nothing"
        if PATHS[path][1] is not None and not PATHS[path][4]:  # two-pass: the apply pass
            assert result["judged"] > 0, "the path never judged a pair"  # reports no cosines
        if PATHS[path][2]:
            assert result["tail"] > 0, "the path routed no tail token"


def test_the_paths_that_must_overlap_did(watched):
    for results in watched:
        assert results["exact micro-batch"]["overlapped"] >= 2
        assert results["exact micro-batch-bf16"]["overlapped"] >= 2
        assert results["exact micro-batch, reduce not overlapped"]["overlapped"] == 0


# -- the stand-in is sharp and faithful ----------------------------------------------------

def _old_lowrank_probe(g_weight):
    """conflict_math.lowrank_basis before issue 23: a CPU-drawn probe copied per call."""
    generator = torch.Generator().manual_seed(1)
    return torch.randn(g_weight.shape[1], 4, generator=generator).to(g_weight)


def _old_modality_codes(routed):
    """expert_load._count_by_modality before issue 23: the codes built per call."""
    return torch.tensor(MODALITY_CODES, device=routed.device)


def test_the_stand_in_sees_each_kind_of_transfer():
    with DeviceStandIn() as stand_in:
        device_tensor = stand_in.to_device(torch.randn(8, 4))
        with stand_in.recording():
            _old_lowrank_probe(device_tensor)
            _old_modality_codes(device_tensor)
            device_tensor[torch.tensor([0, 2])]  # a host index
            device_tensor * 2.0 + torch.ones(())  # 0-d host tensors go by value: not copies
            torch.zeros(3, device=device_tensor.device)  # allocated on the device
            device_tensor.sum().item()  # device to host
    kinds = [(t.kind, t.where.split(" in ")[-1]) for t in stand_in.transfers]
    assert kinds == [("to-device copy", "_old_lowrank_probe"),
                     ("host data", "_old_modality_codes"),
                     ("host tensor in op", "test_the_stand_in_sees_each_kind_of_transfer")]
    assert stand_in.ours() == [] and stand_in.device_to_host == 1


@pytest.fixture
def forget_stand_in_metrics():
    yield
    forget_tracked_moe_metric(TRACKER_NAME)  # later tests of this process record on the CPU


def test_the_stand_in_computes_what_the_cpu_computes(forget_stand_in_metrics):
    """Same weights, same batch: the stand-in layer's cosines are the plain CPU layer's."""
    init_single_process()
    warnings.filterwarnings("ignore")
    hidden, weights, _ = _batch(0, 0)
    plain = build_stgc_layer(moe_config(gated_linear_unit=True), STGCConfig(enabled=True))
    with DeviceStandIn() as stand_in:
        layer = stand_in.move_module(build_stgc_layer(
            moe_config(gated_linear_unit=True, use_cpu_initialization=False),
            STGCConfig(enabled=True)))
        plain.load_state_dict({name: value.inner if isinstance(value, OnDevice) else value
                               for name, value in layer.state_dict().items()})
        out, _ = layer(stand_in.to_device(hidden))
        (out * stand_in.to_device(weights)).sum().backward()
        cos = layer.stgc.last.cos.inner
    # megatron's process-global MoE tracker keeps its buffer on the stand-in: forget it
    forget_tracked_moe_metric(TRACKER_NAME)
    out, _ = plain(hidden)
    (out * weights).sum().backward()
    expected = plain.stgc.last.cos
    assert torch.equal(torch.isnan(cos), torch.isnan(expected)) and (~torch.isnan(cos)).any()
    judged = ~torch.isnan(expected)
    assert torch.allclose(cos[judged], expected[judged], atol=1e-6, rtol=0)


def test_a_copy_into_a_host_tensor_stays_on_the_host():
    with DeviceStandIn() as stand_in:
        device_tensor = stand_in.to_device(torch.arange(4.0))
        host = torch.zeros(4)
        with stand_in.recording():
            result = host.copy_(device_tensor)
    assert result is host and torch.equal(host, torch.arange(4.0))
    assert stand_in.transfers == [] and stand_in.device_to_host == 1
