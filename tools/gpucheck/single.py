"""The in-process checks: one process, one rank, a tiny STGC MoE layer on the device.

Each runs in its own worker process (``tools/gpu_check.py --worker NAME``) that prints one
``GPU_CHECK_RESULT {json}`` line.
"""

from __future__ import annotations

import gc
import json
import os
import traceback
import weakref

from gpucheck.context import REPO, Skip
from gpucheck.tf32 import router_gemm_without_tf32

RESULT = "GPU_CHECK_RESULT "


def init_single_rank(device: str) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_stgc import cpu_bridge

    cpu_bridge.install()
    store = dist.TCPStore("127.0.0.1", 0, world_size=1, is_master=True)  # port 0: no race
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    if device == "cuda":
        torch.cuda.set_device(0)
        # full fp32 matmuls (NGC images allow TF32 by default); oracle-tf32 turns it back on
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    dist.init_process_group("nccl" if device == "cuda" else "gloo", store=store, rank=0,
                            world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)


def check_nccl(device: str) -> str:
    import torch
    import torch.distributed as dist

    tensor = torch.arange(4.0, device=device)
    dist.all_reduce(tensor)
    assert tensor.tolist() == [0.0, 1.0, 2.0, 3.0]
    return f"{dist.get_backend()} all_reduce on {tensor.device}"


def _layer(device, stgc_overrides=None, **config_overrides):
    from megatron_stgc.stgc.config import STGCConfig
    from stgc_utils import build_stgc_layer, moe_config

    stgc = STGCConfig(enabled=True, **(stgc_overrides or {}))
    return build_stgc_layer(moe_config(**config_overrides), stgc).to(device)


def _batch(device, seed=7, dtype=None):
    import torch

    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(64, 4, 16, generator=gen)
    weights = torch.randn(64, 4, 16, generator=gen)
    if dtype is not None:
        hidden, weights = hidden.to(dtype), weights.to(dtype)
    return hidden.to(device), weights.to(device)


def _on(tensor, device) -> bool:
    return tensor.device.type == device


def check_stgc_modes(device: str) -> str:
    import torch

    from megatron_stgc.stgc.two_pass import two_pass_forward_backward

    hidden, weights = _batch(device)
    details = []
    grads = {}
    for name, overrides in (("single-pass", {}), ("fc2", {"estimator": "fc2"}),
                            ("lowrank", {"estimator": "lowrank", "estimator_rank": 8})):
        layer = _layer(device, overrides, gated_linear_unit=True)
        out, _ = layer(hidden)
        capture = weakref.ref(layer.stgc.current.capture)
        (out * weights).sum().backward()
        del out
        gc.collect()
        report = layer.stgc.last
        assert all(_on(t, device) for t in (report.cos, report.conflicts, report.routing_map))
        assert capture() is None, f"{name}: capture alive after backward"
        judged = ~torch.isnan(report.cos)
        assert judged.any() and torch.isfinite(report.cos[judged]).all()
        details.append(f"{name} {int(report.conflicts.sum())}/{int(judged.sum())} conflicts")
        if name == "single-pass":
            grads["single"] = layer.router.weight.grad.clone()
    layer = _layer(device, gated_linear_unit=True)

    def forward_backward():
        out, _ = layer(hidden)
        (out * weights).sum().backward()

    def zero_grads():
        for param in layer.parameters():
            param.grad = None

    two_pass_forward_backward(layer, forward_backward, zero_grads)
    difference = float((layer.router.weight.grad - grads["single"]).abs().max())
    assert difference < 1e-5, f"two-pass router grad differs from single-pass by {difference}"
    details.append(f"two-pass == single-pass (max diff {difference:.1e})")
    return "; ".join(details)


def _check_oracle(device: str, bf16: bool, tf32: bool = False) -> str:
    import torch

    from stgc_utils import oracle_pair_cosines

    if tf32:
        if device != "cuda":
            raise Skip("TF32 exists on CUDA only")
        torch.backends.cuda.matmul.allow_tf32 = True
    overrides = dict(gated_linear_unit=True)
    if bf16:
        overrides.update(bf16=True, params_dtype=torch.bfloat16)
    layer = _layer(device, **overrides)
    hidden, weights = _batch(device, seed=9, dtype=torch.bfloat16 if bf16 else None)
    out, _ = layer(hidden)
    (out.float() * weights.float()).sum().backward()
    report = layer.stgc.last
    expected, routing_map = oracle_pair_cosines(layer, hidden, weights)
    got = report.cos.double().cpu()
    judged = ~torch.isnan(expected)
    assert torch.equal(report.routing_map.cpu(), routing_map.cpu())
    assert torch.equal(torch.isnan(got), ~judged)
    error = float((got[judged] - expected[judged]).abs().max())
    tolerance = 0.05 if bf16 or tf32 else 1e-4
    if not tf32:  # TF32's error is what this check measures; only the flags must hold
        assert error < tolerance, f"max cosine error {error:.2e} >= {tolerance}"
    clear = judged & (expected.abs() > tolerance)
    disagree = int((report.conflicts.cpu()[clear] != (expected[clear] < 0)).sum())
    assert disagree == 0, f"{disagree} flags differ from the oracle away from |cos| < {tolerance}"
    return f"{int(judged.sum())} pairs, max |cos - oracle| {error:.1e}"


def check_oracle_fp32(device: str) -> str:
    return _check_oracle(device, bf16=False)


def check_oracle_bf16(device: str) -> str:
    return _check_oracle(device, bf16=True)


def check_oracle_tf32(device: str) -> str:
    return _check_oracle(device, bf16=False, tf32=True)


def reference_errors(device: str) -> dict:
    """The stored fixture's cosines, flags and router-gradient change recomputed on
    ``device``: {"cos": max cosine error, "flags": flags equal away from tau,
    "router_grad": max router-gradient error}."""
    import torch
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    reference = torch.load(os.path.join(REPO, "tests", "fixtures", "stgc_reference.pt"),
                           weights_only=False)
    results = {}
    for beta in (reference["beta"], 0.0):
        MoEAuxLossAutoScaler.main_loss_backward_scale = None
        layer = _layer(device, {"tau": reference["tau"], "beta": beta}, **reference["config"])
        with torch.no_grad():
            for name, param in layer.named_parameters():
                param.copy_(reference["weights"][name].to(device))
        out, _ = layer(reference["hidden"].to(device))
        tokens = out.shape[0] * out.shape[1]
        ((out * reference["loss_weights"].to(device)).sum() / tokens).backward()
        results[beta] = (layer.stgc.last, layer.router.weight.grad.double().cpu())
    report, with_stgc = results[reference["beta"]]
    expected = reference["cos"]
    judged = ~torch.isnan(expected)
    near = (expected - reference["tau"]).abs() < 1e-4
    change = with_stgc - results[0.0][1]
    return {"cos": float((report.cos.double().cpu()[judged] - expected[judged]).abs().max()),
            "flags": torch.equal(report.conflicts.cpu()[~near], reference["conflicts"][~near]),
            "router_grad": float((change - reference["router_grad_change"]).abs().max())}


def compare_with_reference(device: str) -> dict:
    """reference_errors within the check's tolerances (cos 1e-4, router grad 1e-5)."""
    errors = reference_errors(device)
    assert errors["cos"] < 1e-4, f"cosines off by {errors['cos']:.2e}"
    assert errors["flags"], "conflict flags differ from the fixture away from tau"
    assert errors["router_grad"] < 1e-5, \
        f"router gradient change off by {errors['router_grad']:.2e}"
    return errors


def check_reference(device: str) -> str:
    note = router_gemm_without_tf32(device)
    errors = compare_with_reference(device)
    return f"cos error {errors['cos']:.1e}, router-grad error {errors['router_grad']:.1e}; {note}"


CHECKS = {"nccl": check_nccl, "stgc-modes": check_stgc_modes,
          "oracle-fp32": check_oracle_fp32, "oracle-bf16": check_oracle_bf16,
          "oracle-tf32": check_oracle_tf32, "reference": check_reference}


def worker(name: str, device: str) -> None:
    """Run one in-process check; print its result as one JSON line."""
    try:
        init_single_rank(device)
        outcome = {"status": "passed", "detail": CHECKS[name](device)}
    except Skip as skip:
        outcome = {"status": "skipped", "detail": str(skip)}
    except BaseException as error:  # noqa: BLE001 - every failure goes into the table
        traceback.print_exc()
        outcome = {"status": "failed", "detail": f"{type(error).__name__}: {error}"}
    print(RESULT + json.dumps(outcome), flush=True)


def read_result(log_path: str) -> dict:
    """The worker's result line from its log (failed when there is none)."""
    with open(log_path) as f:
        lines = [line for line in f.read().splitlines() if line.startswith(RESULT)]
    if not lines:
        with open(log_path) as f:
            return {"status": "failed", "detail": f"no result line: ...{f.read()[-400:]}"}
    return json.loads(lines[-1][len(RESULT):])
