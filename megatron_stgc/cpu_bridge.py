"""Run megatron-core's MoE training path on CPU (gloo) when CUDA is absent.

megatron-core 0.16 assumes a CUDA device in a handful of places that the MoE
training path reaches. Each patch below is named, says which assumption it
bridges, and is covered by tests/test_cpu_bridge.py. ``install()`` does nothing
when CUDA is available, so GPU runs use megatron-core untouched.

Patches (all applied by ``install()``):

* ``current_device``      ``torch.cuda.current_device()`` is used as a device
                          argument (buffers, router weights, TP mappings, DDP grad
                          buffers, causal masks). On CPU it returns ``"cpu"``.
* ``rng_state``           ``torch.cuda.get_rng_state`` / megatron's
                          ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` back the model-parallel RNG
                          tracker and activation-checkpoint RNG replay. On CPU
                          they read and write the CPU generator.
* ``streams``             the alltoall dispatcher creates a ``torch.cuda.Stream``
                          and syncs device-to-host copies on it; on CPU these are
                          ``torch.cpu`` streams/events (no-ops).
* ``alltoall_splits``     ``maybe_move_tensor_to_cpu`` leaves CPU split tensors as
                          tensors, but gloo's ``all_to_all_single`` wants lists;
                          on CPU, split tensors asked for "as numpy" become lists.
* ``te_general_gemm``     ``moe_utils.te_general_gemm`` is only defined when
                          Transformer Engine imports; the router gating function
                          reads it unconditionally. Define it as ``None``.
* ``causal_mask``         ``get_default_causal_mask`` (used by the unfused softmax
                          when no mask is passed) builds its mask on "cuda"; on
                          CPU it builds the same upper-triangular mask on the CPU.
* ``schedules_device``    megatron's pipeline schedules allocate their token
                          counter with ``device="cuda"``; on CPU that allocation
                          goes to the CPU.
"""

from __future__ import annotations

import functools
import types

import torch

_INSTALLED: list[str] = []


def cuda_available() -> bool:
    return torch.cuda.is_available()


def installed_patches() -> list[str]:
    """Names of the patches applied in this process (empty on GPU)."""
    return list(_INSTALLED)


def _patch_current_device() -> None:
    torch.cuda.current_device = lambda: "cpu"


def _patch_rng_state() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)

    def get_cpu_rng_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_cpu_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mcore_random._get_cuda_rng_state = get_cpu_rng_state
    mcore_random._set_cuda_rng_state = set_cpu_rng_state
    # megatron seeds the tracker with torch.cuda.manual_seed inside fork/add;
    # on CPU that must seed the CPU generator, which the tracker then snapshots.
    torch.cuda.manual_seed = torch.manual_seed


class _CpuEvent:
    def synchronize(self) -> None:
        return None

    def wait(self, stream=None) -> None:
        return None


class _CpuStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream) -> None:
        return None

    def record_event(self, event=None) -> _CpuEvent:
        return _CpuEvent()

    def synchronize(self) -> None:
        return None


_CPU_STREAM = _CpuStream()


def _patch_streams() -> None:
    torch.cuda.Stream = _CpuStream
    torch.cuda.current_stream = lambda device=None: _CPU_STREAM
    torch.cuda.stream = lambda stream=None: torch.cpu.stream(None)


def _patch_alltoall_splits() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    @functools.wraps(original)
    def move_to_cpu_as_lists(tensor, as_numpy=False, record_stream=False):
        tensor = original(tensor, as_numpy=as_numpy, record_stream=False)
        if as_numpy and torch.is_tensor(tensor):
            return tensor.tolist()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = move_to_cpu_as_lists
    token_dispatcher.maybe_move_tensor_to_cpu = move_to_cpu_as_lists


def _patch_te_general_gemm() -> None:
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


class _CpuTorchForSchedules(types.ModuleType):
    """``torch`` as megatron's schedules module sees it: ``device="cuda"`` -> CPU."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        if device == "cuda":
            device = "cpu"
        return torch.zeros(*args, device=device, **kwargs)


def _patch_schedules_device() -> None:
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _CpuTorchForSchedules()


def _patch_causal_mask() -> None:
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as transformer_utils

    @functools.lru_cache(maxsize=None)
    def cpu_causal_mask(sq: int) -> torch.Tensor:
        return torch.ones(sq, sq, dtype=torch.bool).triu(diagonal=1)

    transformer_utils.get_default_causal_mask = cpu_causal_mask
    fused_softmax.get_default_causal_mask = cpu_causal_mask


_PATCHES = {
    "current_device": _patch_current_device,
    "rng_state": _patch_rng_state,
    "streams": _patch_streams,
    "alltoall_splits": _patch_alltoall_splits,
    "te_general_gemm": _patch_te_general_gemm,
    "causal_mask": _patch_causal_mask,
    "schedules_device": _patch_schedules_device,
}


def install() -> list[str]:
    """Apply every CPU patch once; a no-op when CUDA is available.

    Returns the names of the patches in force in this process.
    """
    if cuda_available() or _INSTALLED:
        return installed_patches()
    for name, patch in _PATCHES.items():
        patch()
        _INSTALLED.append(name)
    return installed_patches()
