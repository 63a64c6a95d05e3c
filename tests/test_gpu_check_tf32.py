"""The GPU check's reference entry with Transformer Engine's router GEMM in TF32, emulated.

Where TE is installed megatron-core runs the fp32 router GEMM through ``te_general_gemm``
(``moe_utils.RouterGatingLinearFunction``), and TE runs pure-fp32 GEMMs as TF32; torch's
``allow_tf32`` does not reach it. Here the CPU stands in: ``te_general_gemm`` becomes a
GEMM whose inputs are rounded to TF32 (10-bit mantissa, round to nearest) with fp32
accumulation, as TE's would be. megatron-core's own router code calls it. Shown:
  * without the fix the reference check's tolerance (router gradient 1e-5) fails;
  * with the check's environment (NVIDIA_TF32_OVERRIDE=0, emulated as honoured by TE)
    it passes;
  * where the override does not reach TE, the check sees TF32 in the router GEMM, sends
    it through torch for its process and passes, saying so.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from megatron.core.transformer.moe import moe_utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPO, "tools")]

from gpucheck import single, tf32  # noqa: E402
from stgc_utils import init_single_process  # noqa: E402


def to_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> TF32 (10 explicit mantissa bits), round to nearest (ties away from zero)."""
    bits = x.float().contiguous().view(torch.int32).to(torch.int64)
    rounded = ((bits + 0x1000) & ~0x1FFF).to(torch.int32)
    return rounded.view(torch.float32)


def emulated_te_general_gemm(honours_override: bool):
    """megatron's ``te_general_gemm(A, B, out_dtype, layout, out, bias, grad)`` with TE's
    cuBLASLt layouts (row-major view): TN -> B A^T (+ bias), NN -> B A, NT -> B^T A."""

    def gemm(A, B, out_dtype=None, layout="TN", out=None, bias=None, grad=False):
        tf32_on = not (honours_override and os.environ.get("NVIDIA_TF32_OVERRIDE") == "0")
        if tf32_on and A.dtype == B.dtype == torch.float32 and out_dtype == torch.float32:
            A, B = to_tf32(A), to_tf32(B)
        product = {"TN": lambda: B @ A.t(), "NN": lambda: B @ A, "NT": lambda: B.t() @ A}
        result = product[layout]().to(out_dtype or A.dtype)
        if bias is not None:
            result = result + bias
        return [result, None, None, None]

    return gemm


@pytest.fixture
def te_router_gemm(monkeypatch):
    init_single_process()

    def install(honours_override: bool, env: dict):
        monkeypatch.setattr(moe_utils, "te_general_gemm", emulated_te_general_gemm(honours_override))
        monkeypatch.delenv("NVIDIA_TF32_OVERRIDE", raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)

    return install


def test_tf32_rounding_is_what_tf32_keeps():
    x = torch.tensor([1.0 + 2 ** -10, 1.0 + 2 ** -11 + 2 ** -20, 1.0 + 2 ** -12, -3.0])
    assert to_tf32(x).tolist() == [1.0 + 2 ** -10, 1.0 + 2 ** -10, 1.0, -3.0]


def test_without_the_fix_the_reference_check_fails(te_router_gemm):
    te_router_gemm(honours_override=True, env={})  # the old check: no override
    assert tf32.router_gemm_error("cpu") > 1e-4  # the emulated GEMM really is TF32
    errors = single.reference_errors("cpu")
    print(f"TF32 router GEMM: cos error {errors['cos']:.2e}, "
          f"router-grad error {errors['router_grad']:.2e}")
    assert errors["router_grad"] > 1e-5  # past the check's tolerance
    with pytest.raises(AssertionError, match="off by"):
        single.compare_with_reference("cpu")


def test_with_the_checks_environment_the_reference_check_passes(te_router_gemm):
    te_router_gemm(honours_override=True, env=tf32.check_env("reference"))
    detail = single.check_reference("cpu")
    assert "router GEMM fp32" in detail
    errors = single.reference_errors("cpu")
    assert errors["router_grad"] < 1e-6 and errors["cos"] < 1e-6


def test_where_the_override_misses_te_the_check_bypasses_it(te_router_gemm):
    te_router_gemm(honours_override=False, env=tf32.check_env("reference"))
    detail = single.check_reference("cpu")
    assert "sent through torch" in detail and moe_utils.te_general_gemm is None


def test_tf32_stays_on_only_for_the_check_that_measures_it():
    assert tf32.check_env("oracle-tf32") == {}
    for name in ("reference", "oracle-fp32", "stgc-modes", "layout-ep", "train-resume"):
        assert tf32.check_env(name) == {"NVIDIA_TF32_OVERRIDE": "0"}
