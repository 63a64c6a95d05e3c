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
                          reads it unconditionally. Define it as ``None``. Needed
                          up to megatron-core 0.18; 0.19 defines it itself (the
                          patch then does nothing and is not listed as installed).
* ``causal_mask``         ``get_default_causal_mask`` (used by the unfused softmax
                          when no mask is passed) builds its mask on "cuda"; on
                          CPU it builds the same upper-triangular mask on the CPU.
* ``schedules_device``    megatron's pipeline schedules allocate their token
                          counter with ``device="cuda"``; on CPU that allocation
                          goes to the CPU.
* ``optimizer_device``    megatron's optimizers, grad scalers, gradient clipping and
                          DDP grad buffers create small tensors (loss scale,
                          found-inf flag, grad norm; also the local
                          multi-tensor l2-norm in megatron.core.utils) with
                          ``device="cuda"``; on CPU
                          those factory calls create CPU tensors.
* ``tensor_type_checks``  gradient clipping, the BF16 optimizer and the distributed
                          optimizer sort parameters by ``param.type()`` strings
                          ("torch.cuda.FloatTensor", ...). While those three run,
                          a CPU tensor's ``type()`` reports the CUDA name, so CPU
                          parameters are sorted as the same dtype on GPU would be.
* ``checkpoint_device``   dist_checkpointing's save path calls
                          ``torch.cuda.synchronize()`` before writing and
                          reduces its validation flag on ``device="cuda"``; on CPU
                          synchronize is a no-op and the flag is a CPU tensor.
* ``vit_position_ids``    ``CLIPViTModel.__init__`` moves its position ids to the GPU
                          with ``.cuda()``; while it runs on CPU, ``Tensor.cuda()``
                          returns the tensor itself, so the ids stay on the CPU.
* ``stream_capturing``    megatron-core's routing tracer (router_trace.py, 0.19 on;
                          --moe-routing-trace-path) asks
                          ``torch.cuda.is_current_stream_capturing()`` in every
                          router hook, which a CPU build of torch cannot answer; on
                          CPU it is False (nothing is captured). Only where
                          megatron-core has the tracer.
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch

_INSTALLED: list[str] = []


def cuda_available() -> bool:
    return torch.cuda.is_available()


def installed_patches() -> list[str]:
    """Names of the patches applied in this process (empty on GPU)."""
    return list(_INSTALLED)


_CURRENT_DEVICE = ["cpu"]  # what the bridged torch.cuda.current_device() returns


def _patch_current_device() -> None:
    torch.cuda.current_device = lambda: _CURRENT_DEVICE[-1]


@contextlib.contextmanager
def current_device_is(device):
    """Inside: the bridged ``torch.cuda.current_device()`` returns ``device`` (the device
    stand-in of analysis/host_copies.py, so megatron-core allocates there as on a GPU)."""
    if "current_device" not in _INSTALLED:
        raise RuntimeError("current_device_is needs the CPU bridge's current_device patch")
    _CURRENT_DEVICE.append(device)
    try:
        yield
    finally:
        _CURRENT_DEVICE.pop()


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


def _te_general_gemm_missing() -> bool:
    from megatron.core.transformer.moe import moe_utils

    return not hasattr(moe_utils, "te_general_gemm")


def _patch_te_general_gemm() -> None:
    from megatron.core.transformer.moe import moe_utils

    moe_utils.te_general_gemm = None


def _cpu_if_cuda(device):
    if device == "cuda" or (isinstance(device, torch.device) and device.type == "cuda"):
        return "cpu"
    return device


class _CpuDeviceTorch(types.ModuleType):
    """``torch`` as a megatron module sees it: factory calls with ``device="cuda"`` -> CPU.

    Installed as the ``torch`` global of the megatron modules that hard-code
    ``device="cuda"``; every other attribute is the real ``torch``.
    """

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device=_cpu_if_cuda(device), **kwargs)

    @staticmethod
    def ones(*args, device=None, **kwargs):
        return torch.ones(*args, device=_cpu_if_cuda(device), **kwargs)

    @staticmethod
    def empty(*args, device=None, **kwargs):
        return torch.empty(*args, device=_cpu_if_cuda(device), **kwargs)

    @staticmethod
    def tensor(*args, device=None, **kwargs):
        return torch.tensor(*args, device=_cpu_if_cuda(device), **kwargs)


def _patch_schedules_device() -> None:
    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _CpuDeviceTorch()


def _patch_optimizer_device() -> None:
    from megatron.core import utils as mcore_utils
    from megatron.core.distributed import param_and_grad_buffer
    from megatron.core.optimizer import clip_grads, distrib_optimizer, grad_scaler
    from megatron.core.optimizer import optimizer as mcore_optimizer

    # utils: the local (non-apex) multi_tensor_l2norm returns its norm on "cuda".
    for module in (mcore_optimizer, clip_grads, grad_scaler, distrib_optimizer,
                   param_and_grad_buffer, mcore_utils):
        module.torch = _CpuDeviceTorch()


def _patch_checkpoint_device() -> None:
    from megatron.core.dist_checkpointing.strategies import state_dict_saver

    torch.cuda.synchronize = lambda device=None: None
    state_dict_saver.torch = _CpuDeviceTorch()


@contextlib.contextmanager
def _tensor_type_reports_cuda():
    """Inside: ``cpu_tensor.type()`` names the CUDA type ("torch.cuda.FloatTensor")."""
    original = torch.Tensor.type

    def type_as_cuda(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            return original(self).replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_as_cuda
    try:
        yield
    finally:
        torch.Tensor.type = original


def _reporting_cuda_tensor_types(function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with _tensor_type_reports_cuda():
            return function(*args, **kwargs)

    return wrapper


def _patch_tensor_type_checks() -> None:
    from megatron.core.optimizer import clip_grads, distrib_optimizer
    from megatron.core.optimizer import optimizer as mcore_optimizer

    clipping = _reporting_cuda_tensor_types(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = clipping
    mcore_optimizer.clip_grad_by_total_norm_fp32 = clipping
    for cls in (mcore_optimizer.Float16OptimizerWithFloat16Params,
                distrib_optimizer.DistributedOptimizer):
        cls.__init__ = _reporting_cuda_tensor_types(cls.__init__)


def _patch_causal_mask() -> None:
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as transformer_utils

    @functools.lru_cache(maxsize=None)
    def cpu_causal_mask(sq: int) -> torch.Tensor:
        return torch.ones(sq, sq, dtype=torch.bool).triu(diagonal=1)

    transformer_utils.get_default_causal_mask = cpu_causal_mask
    fused_softmax.get_default_causal_mask = cpu_causal_mask


@contextlib.contextmanager
def _tensor_cuda_is_identity():
    """Inside: ``tensor.cuda()`` returns ``tensor`` (it stays on the CPU)."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _patch_vit_position_ids() -> None:
    from megatron.core.models.vision.clip_vit_model import CLIPViTModel

    original = CLIPViTModel.__init__

    @functools.wraps(original)
    def init_on_cpu(self, *args, **kwargs):
        with _tensor_cuda_is_identity():
            original(self, *args, **kwargs)

    CLIPViTModel.__init__ = init_on_cpu


def _has_router_tracer() -> bool:
    from megatron_stgc.mcore_compat import router_tracer_class

    return router_tracer_class() is not None


def _patch_stream_capturing() -> None:
    torch.cuda.is_current_stream_capturing = lambda: False


_PATCHES = {
    "current_device": _patch_current_device,
    "rng_state": _patch_rng_state,
    "streams": _patch_streams,
    "alltoall_splits": _patch_alltoall_splits,
    "te_general_gemm": _patch_te_general_gemm,
    "causal_mask": _patch_causal_mask,
    "schedules_device": _patch_schedules_device,
    "optimizer_device": _patch_optimizer_device,
    "tensor_type_checks": _patch_tensor_type_checks,
    "checkpoint_device": _patch_checkpoint_device,
    "vit_position_ids": _patch_vit_position_ids,
    "stream_capturing": _patch_stream_capturing,
}


# Patches that only some megatron-core versions need: name -> "is it needed here?"
_NEEDED_WHEN = {
    "te_general_gemm": _te_general_gemm_missing,
    "stream_capturing": _has_router_tracer,
}


_NEEDED: dict[str, bool] = {}  # decided once, before any patch changes what it looks at


def patch_needed(name: str) -> bool:
    """Whether this megatron-core version has the CUDA assumption patch ``name`` bridges."""
    if name not in _NEEDED:
        _NEEDED[name] = _NEEDED_WHEN.get(name, lambda: True)()
    return _NEEDED[name]


def install(exclude: tuple[str, ...] = ()) -> list[str]:
    """Apply every CPU patch once; a no-op when CUDA is available.

    ``exclude`` names patches to leave out (tests/test_cpu_bridge.py uses it to
    show that each patch is needed). Returns the names of the patches in force
    in this process.
    """
    unknown = set(exclude) - set(_PATCHES)
    if unknown:
        raise ValueError(f"unknown CPU bridge patches {sorted(unknown)}; known: {list(_PATCHES)}")
    if cuda_available() or _INSTALLED:
        return installed_patches()
    for name, patch in _PATCHES.items():
        if name in exclude or not patch_needed(name):
            continue
        patch()
        _INSTALLED.append(name)
    return installed_patches()
