"""Each CPU-bridge patch is needed: its megatron-core call fails without it and works with it.

Every check runs in a fresh interpreter (the bridge patches process-wide
state), see tests/bridge_checks.py. The processes run concurrently.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from megatron_stgc import cpu_bridge


def megatron_core_version() -> str:
    import megatron.core

    return megatron.core.__version__

HERE = os.path.dirname(os.path.abspath(__file__))
CHECK_SCRIPT = os.path.join(HERE, "bridge_checks.py")

# What the failure without the patch looks like (it must fail for the right reason).
FAILURE_WITHOUT = {
    "current_device": "Torch not compiled with CUDA enabled",
    "rng_state": "Torch not compiled with CUDA enabled",
    "streams": "torch.cuda.Stream requires CUDA support",
    "alltoall_splits": "all_to_all_single(): incompatible function arguments",
    "te_general_gemm": "name 'te_general_gemm' is not defined",
    "causal_mask": "Torch not compiled with CUDA enabled",
    "schedules_device": "Torch not compiled with CUDA enabled",
    "optimizer_device": "Torch not compiled with CUDA enabled",
    "tensor_type_checks": "assert param.grad.type() == 'torch.cuda.FloatTensor'",
    "checkpoint_device": "Torch not compiled with CUDA enabled",
    "vit_position_ids": "Torch not compiled with CUDA enabled",
    "stream_capturing": "Tried to instantiate dummy base class _cuda_isCurrentStreamCapturing",
}

pytestmark = pytest.mark.skipif(cpu_bridge.cuda_available(),
                                reason="the bridge is a no-op when CUDA is present")


def _start(*args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, CHECK_SCRIPT, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


@pytest.fixture(scope="module")
def outcomes() -> dict[str, tuple[int, str]]:
    """{"with_bridge" or "without_<patch>": (exit code, output)}, run concurrently."""
    processes = {"with_bridge": _start("all")}
    for patch in FAILURE_WITHOUT:
        processes[f"without_{patch}"] = _start(patch, "--exclude", patch)
    results = {}
    for name, process in processes.items():
        output, _ = process.communicate(timeout=600)
        results[name] = (process.returncode, output)
    return results


def test_every_patch_has_a_check():
    from bridge_checks import CHECKS

    assert set(FAILURE_WITHOUT) == set(cpu_bridge._PATCHES) == set(CHECKS)


def test_all_checks_pass_with_the_bridge(outcomes):
    code, output = outcomes["with_bridge"]
    assert code == 0, output
    for patch in FAILURE_WITHOUT:
        assert f"check {patch}: ok" in output


@pytest.mark.parametrize("patch", sorted(FAILURE_WITHOUT))
def test_check_fails_without_its_patch(patch, outcomes):
    if not cpu_bridge.patch_needed(patch):
        pytest.skip(f"megatron-core {megatron_core_version()} does not need {patch}")
    code, output = outcomes[f"without_{patch}"]
    assert code != 0, f"{patch}: the check passed without the patch:\n{output}"
    assert FAILURE_WITHOUT[patch] in output, output


def test_unknown_patch_name_is_rejected():
    with pytest.raises(ValueError, match="unknown CPU bridge patches"):
        cpu_bridge.install(exclude=("no_such_patch",))


def test_current_device_can_name_a_stand_in_for_a_while():
    """analysis/host_copies.py's device stand-in: megatron allocates there while inside."""
    cpu_bridge.install()
    with cpu_bridge.current_device_is("meta"):
        import torch

        assert torch.cuda.current_device() == "meta"
        assert torch.empty(2, device=torch.cuda.current_device()).is_meta
    assert torch.cuda.current_device() == "cpu"
