"""TF32 in the GPU check: off for every check but oracle-tf32, Transformer Engine included.

``torch.backends.cuda.matmul.allow_tf32 = False`` covers torch's own matmuls only. Where
Transformer Engine is installed megatron-core sends the fp32 router GEMM through TE
(``moe_utils.RouterGatingLinearFunction``: ``te_general_gemm(weight, inp, router_dtype,
layout="TN")`` forward, "NN" / "NT" backward, in 0.16.1 to 0.19.2), and TE asks cuBLASLt
for ``CUBLAS_COMPUTE_32F_FAST_TF32`` on every pure-fp32 GEMM
(``transformer_engine/common/gemm/cublaslt_gemm.cu``: "Use TF32 only for pure FP32 GEMM").
Emulated on the CPU (tests/test_gpu_check_tf32.py) that costs the reference check a
router-gradient error several times its 1e-5 tolerance.

So every check process but oracle-tf32's gets ``NVIDIA_TF32_OVERRIDE=0`` (NVIDIA's
switch for its libraries, read when cuBLAS loads). Whether it reaches TE's explicit
FAST_TF32 request has not been seen on a GPU: the reference check measures megatron's
router GEMM first (``router_gemm_error``) and, where it still rounds like TF32, sends that
GEMM through torch for its own process (``bypass_te_router_gemm``) and says so in its
result.
"""

from __future__ import annotations

import torch

TF32_OFF = {"NVIDIA_TF32_OVERRIDE": "0"}
TF32_CHECKS = ("oracle-tf32",)  # the checks that measure TF32 and must keep it
# fp32 GEMMs of this size are off by ~1e-7 relative; TF32 (10-bit mantissa) by ~1e-3
TF32_LIKE_ERROR = 1e-5


def check_env(name: str) -> dict:
    """Environment for every process of check ``name``."""
    return {} if name in TF32_CHECKS else dict(TF32_OFF)


def router_gemm_error(device: str) -> float:
    """Largest relative error of megatron's fp32 router GEMM (forward, input and weight
    gradients) against float64, on random inputs; ~1e-7 in fp32, ~1e-3 in TF32."""
    from megatron.core.transformer.moe.moe_utils import router_gating_linear

    gen = torch.Generator().manual_seed(0)
    inp = torch.randn(256, 64, generator=gen).to(device).requires_grad_(True)
    weight = torch.randn(8, 64, generator=gen).to(device).requires_grad_(True)
    grad = torch.randn(256, 8, generator=gen).to(device)
    out = router_gating_linear(inp, weight, None, torch.float32)
    out.backward(grad)
    x, w, g = inp.detach().double(), weight.detach().double(), grad.double()
    pairs = ((out.detach(), x @ w.t()), (inp.grad, g @ w), (weight.grad, g.t() @ x))
    return max(float((got.double() - want).abs().max() / want.abs().max())
               for got, want in pairs)


def bypass_te_router_gemm() -> bool:
    """Send megatron's router GEMM through torch (which honours allow_tf32) in this process;
    False when it does not go through TE anyway."""
    from megatron.core.transformer.moe import moe_utils

    if getattr(moe_utils, "te_general_gemm", None) is None:
        return False
    moe_utils.te_general_gemm = None  # read at call time by RouterGatingLinearFunction
    return True


def router_gemm_without_tf32(device: str) -> str:
    """Make sure the router GEMM of this process is not TF32; returns a note for the result."""
    error = router_gemm_error(device)
    if error < TF32_LIKE_ERROR:
        return f"router GEMM fp32 (rel. error {error:.0e})"
    if not bypass_te_router_gemm():
        raise AssertionError(f"the router GEMM rounds like TF32 (rel. error {error:.1e}) "
                             "with TF32 off, and not through Transformer Engine")
    after = router_gemm_error(device)
    if after >= TF32_LIKE_ERROR:
        raise AssertionError(f"router GEMM still off by {after:.1e} after bypassing TE")
    return (f"TE router GEMM rounded like TF32 (rel. error {error:.1e}) despite "
            f"NVIDIA_TF32_OVERRIDE=0: sent through torch (rel. error {after:.0e})")
