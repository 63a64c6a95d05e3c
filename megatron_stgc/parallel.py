"""Process groups: torch.distributed + megatron-core parallel_state (DP x EP, TP)."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_stgc import cpu_bridge


def world_size_from_env() -> int:
    """World size as torchrun sets it (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def free_port() -> int:
    """A local port free now, for processes spawned together that must agree on one before
    any of them binds it (another process may take it meanwhile: one-process groups use
    ``initialize_distributed``'s port-0 store instead)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize_distributed(timeout_minutes: int = 10) -> None:
    """Create the default process group: NCCL on GPU, gloo on CPU (bridge installed).

    Reads RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT as set by torchrun; a single
    process without torchrun gets a one-rank group on a local port.
    """
    cpu_bridge.install()
    if dist.is_initialized():
        return
    store = None
    if "RANK" not in os.environ:
        # one process: its store binds port 0 (the OS picks a free port atomically; choosing a
        # port first and binding it later races with other processes: EADDRINUSE)
        store = dist.TCPStore("127.0.0.1", 0, world_size=1, is_master=True,
                              timeout=datetime.timedelta(minutes=timeout_minutes))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(store.port))
        os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"] = "0", "1", "0"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    extra = {} if store is None else {"store": store, "rank": 0, "world_size": 1}
    dist.init_process_group(backend=backend,
                            timeout=datetime.timedelta(minutes=timeout_minutes), **extra)


def initialize_model_parallel(tensor_parallel_size: int, expert_parallel_size: int,
                              seed: int, expert_tensor_parallel_size: int | None = None) -> None:
    """megatron-core parallel state (PP=1) and the model-parallel RNG tracker.

    expert_tensor_parallel_size: None = megatron's default (the TP size)."""
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=1,
        expert_model_parallel_size=expert_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def collective_device() -> torch.device:
    """Where tensors for this process group's collectives live: the GPU under NCCL, else CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def destroy() -> None:
    """Tear down megatron-core parallel state and the default process group."""
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
