"""Find host-to-device copies in a forward and backward on a machine without a GPU.

On a GPU, copying a host tensor to the device (``cpu_tensor.to(cuda)``, ``.to(other)``,
``torch.tensor(data, device=cuda)``, a host index tensor used on a device tensor) from
pageable memory makes the host wait for the copy: a host sync in the training step.
On the CPU nothing is copied, so nothing can be seen. ``DeviceStandIn`` gives the
device an identity of its own:

* ``OnDevice`` tensors hold CPU data but report the meta device (and ``is_cuda``, so
  megatron-core takes its GPU branches, e.g. its device-to-host copy of the split sizes);
* the mode (a ``TorchDispatchMode``, the style of ``comm_count.py``) runs every op on
  the CPU data and wraps what the op produced on the device; factories called with
  the stand-in device (``torch.zeros(n, device=x.device)``) allocate on it, no copy;
* while inside, the CPU bridge's ``torch.cuda.current_device()`` returns the stand-in,
  so megatron-core allocates its buffers and parameters there, as on a GPU.

Recorded, with the Python frame that asked for it (``Transfer``), while ``recording()``:
  to-device copy     ``_to_copy`` / ``copy_`` of a host tensor onto the device;
  host data          ``torch.tensor`` / ``as_tensor`` / ``asarray`` / ``new_tensor`` with
                     the device (built on the host, then copied);
  host tensor in op  a host tensor with more than one element in an op on device
                     tensors (on a GPU: an implicit copy for indices, else an error).
0-d host tensors are not counted: CUDA kernels take them by value. Device-to-host copies
(``.cpu()``, ``.item()``, ``.tolist()``) are counted in ``device_to_host`` for reference.
Limits: a copy made inside a C++ op that never reaches the dispatcher is not seen; the
stand-in runs the CPU kernels, so numbers are CPU numbers.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

STAND_IN = torch.device("meta")
PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))
_HERE = os.path.abspath(__file__)
_HOST_DATA = {torch.tensor, torch.as_tensor, torch.asarray, torch.Tensor.new_tensor}
_COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}


def _is_device(device) -> bool:
    """The stand-in, or a CUDA device a module names explicitly (``.cuda()``)."""
    if isinstance(device, str):
        device = torch.device(device)
    return isinstance(device, torch.device) and device.type in ("meta", "cuda")


class OnDevice(torch.Tensor):
    """A tensor on the stand-in device: CPU data in ``inner``, the meta device outside."""

    __torch_function__ = torch._C._disabled_torch_function_impl
    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor, requires_grad: bool = False):
        tensor = torch.Tensor._make_wrapper_subclass(
            cls, inner.size(), strides=inner.stride(), storage_offset=inner.storage_offset(),
            dtype=inner.dtype, device=STAND_IN, requires_grad=requires_grad)
        tensor.inner = inner
        return tensor

    @property
    def is_cuda(self) -> bool:
        return True

    def tolist(self):
        _count_device_to_host()
        return self.inner.tolist()

    def numpy(self, *args, **kwargs):
        _count_device_to_host()
        return self.inner.numpy(*args, **kwargs)

    def __repr__(self) -> str:
        return f"OnDevice({self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func}: an OnDevice tensor used outside DeviceStandIn")


@dataclass
class Transfer:
    kind: str  # "to-device copy" | "host data" | "host tensor in op"
    op: str
    where: str  # innermost frame outside torch and this module: "file:line in function"
    ours: bool  # that frame is in the megatron_stgc package

    def __str__(self) -> str:
        return f"{self.kind} ({self.op}) at {self.where}"


_ACTIVE: list["DeviceStandIn"] = []


def _count_device_to_host() -> None:
    if _ACTIVE and _ACTIVE[-1].is_recording:
        _ACTIVE[-1].device_to_host += 1


def _caller() -> tuple[str, bool]:
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if path == _HERE or path.startswith(_TORCH) or "/contextlib.py" in path:
            continue
        return f"{os.path.relpath(path)}:{frame.lineno} in {frame.name}", \
            path.startswith(PACKAGE + os.sep)
    return "?", False


def _inner(value):
    if isinstance(value, OnDevice):
        return value.inner
    if isinstance(value, torch.device) and _is_device(value):
        return torch.device("cpu")
    if isinstance(value, str) and value in ("meta", "cuda"):
        return "cpu"
    return value


class _HostData(TorchFunctionMode):
    """torch.tensor & co. with the device: built on the host, copied (recorded), wrapped."""

    def __init__(self, stand_in: "DeviceStandIn"):
        super().__init__()
        self.stand_in = stand_in

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _HOST_DATA:
            return func(*args, **kwargs)
        on_device = _is_device(kwargs.get("device"))
        if func is torch.Tensor.new_tensor:
            on_device = on_device or ("device" not in kwargs and isinstance(args[0], OnDevice))
        data = args[1] if func is torch.Tensor.new_tensor else args[0]
        if not on_device or isinstance(data, OnDevice):
            return func(*args, **kwargs)
        self.stand_in.record("host data", getattr(func, "__name__", str(func)))
        host_args = (args[0].inner,) + args[1:] if isinstance(args[0], OnDevice) else args
        host = func(*host_args, **dict(kwargs, device="cpu"))
        return OnDevice(host, requires_grad=host.requires_grad)


class DeviceStandIn(TorchDispatchMode):
    """``with DeviceStandIn() as stand_in:`` build and run on the stand-in device, then
    ``with stand_in.recording(): ...`` the forward and backward to watch.

    ``transfers``: every host-to-device transfer seen while recording;
    ``ours()``: those asked for by this package's code.
    """

    def __init__(self):
        super().__init__()
        self.transfers: list[Transfer] = []
        self.device_to_host = 0
        self.is_recording = False
        self._exits = contextlib.ExitStack()

    # -- context ----------------------------------------------------------------------
    def __enter__(self):
        from megatron_stgc import cpu_bridge

        self._exits.enter_context(cpu_bridge.current_device_is(STAND_IN))
        result = super().__enter__()
        self._exits.enter_context(_HostData(self))
        _ACTIVE.append(self)
        return result

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        self._exits.close()
        return super().__exit__(*exc)

    @contextlib.contextmanager
    def recording(self):
        self.is_recording = True
        try:
            yield self
        finally:
            self.is_recording = False

    def ours(self) -> list[Transfer]:
        return [t for t in self.transfers if t.ours]

    # -- tensors ----------------------------------------------------------------------
    @staticmethod
    def to_device(tensor: torch.Tensor) -> OnDevice:
        """A host tensor placed on the stand-in (a batch's copy: not recorded)."""
        return OnDevice(tensor.detach().clone(), requires_grad=tensor.requires_grad)

    @staticmethod
    def move_module(module: torch.nn.Module) -> torch.nn.Module:
        """What ``module.cuda()`` does, for the stand-in: every parameter or buffer still on
        the host (megatron's router builds its weight there) goes to the device; those
        already there stay the same objects (hooks on them stay attached)."""
        for sub in module.modules():
            for name, param in list(sub._parameters.items()):
                if param is not None and not isinstance(param, OnDevice):
                    sub._parameters[name] = torch.nn.Parameter(
                        OnDevice(param.detach().clone()), requires_grad=param.requires_grad)
            for name, buffer in list(sub._buffers.items()):
                if buffer is not None and not isinstance(buffer, OnDevice):
                    sub._buffers[name] = OnDevice(buffer.clone())
        return module

    def record(self, kind: str, op: str) -> None:
        if self.is_recording:
            where, ours = _caller()
            self.transfers.append(Transfer(kind, op, where, ours))

    # -- dispatch ---------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves, _ = tree_flatten((args, kwargs))
        wrapped = [t for t in leaves if isinstance(t, OnDevice)]
        named = kwargs.get("device")
        if not wrapped and not _is_device(named):
            return func(*args, **kwargs)
        self._note(func, args, leaves, wrapped, named)
        out = func(*tree_map(_inner, args), **tree_map(_inner, kwargs))
        if func is torch.ops.aten._local_scalar_dense.default or \
                (func is torch.ops.aten._to_copy.default and named is not None
                 and not _is_device(named)):
            return out  # the host's copy
        # an op hands back its own (in-place) argument as that argument; the rest is new
        same = {id(t): t for t in leaves if isinstance(t, torch.Tensor)}
        same.update({id(t.inner): t for t in wrapped})
        return tree_map(lambda o: self._wrap(o, same), out)

    @staticmethod
    def _wrap(value, same):
        if not isinstance(value, torch.Tensor) or isinstance(value, OnDevice):
            return value
        known = same.get(id(value))
        return OnDevice(value) if known is None else known

    def _note(self, func, args, leaves, wrapped, named) -> None:
        if func is torch.ops.aten._local_scalar_dense.default:
            _count_device_to_host()
            return
        if func in _COPIES:
            if func is torch.ops.aten.copy_.default:
                source, onto_device = args[1], isinstance(args[0], OnDevice)
            else:  # _to_copy: the device named, else the source's
                source = args[0]
                onto_device = isinstance(source, OnDevice) if named is None else _is_device(named)
            if onto_device and not isinstance(source, OnDevice):
                self.record("to-device copy", str(func))
            elif not onto_device and isinstance(source, OnDevice):
                _count_device_to_host()
            return
        if not wrapped or func.namespace == "c10d":
            return
        host = [t for t in leaves if isinstance(t, torch.Tensor) and not isinstance(t, OnDevice)
                and t.dim() > 0]
        if host:
            self.record("host tensor in op", str(func))
