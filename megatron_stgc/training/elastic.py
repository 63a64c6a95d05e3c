"""torchrun restarts (``--max-restarts``): a fresh key space for every attempt.

With c10d rendezvous torchrun's agent keeps ONE TCPStore for the whole job and
hands it to the workers of every attempt (``TORCHELASTIC_USE_AGENT_STORE=True``).
The keys the first attempt's ``init_process_group`` wrote (gloo's peer
addresses, NCCL's unique id) are still there when the restarted workers
rendezvous, and they read the dead workers' entries: we saw both restarted
CPU ranks hang in ``ProcessGroupGloo(...)`` for good. Workers of attempt N>0
therefore create the default process group on the agent's store behind a
``PrefixStore("megatron_stgc/attempt_N")``. The first attempt (and any launch
without torchrun's agent store) keeps torch's own env:// initialisation.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def restart_attempt() -> int:
    """0 for the first attempt, N after the agent restarted the workers N times."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def init_process_group_after_restart(timeout_minutes: int = 10) -> bool:
    """On a restarted torchrun attempt, create the default group on a per-attempt
    prefix of the agent's store; returns whether it did (no-op otherwise)."""
    attempt = restart_attempt()
    if dist.is_initialized() or attempt == 0 or \
            os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return False
    timeout = datetime.timedelta(minutes=timeout_minutes)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          world_size, is_master=False, timeout=timeout)
    store = dist.PrefixStore(f"megatron_stgc/attempt_{attempt}", store)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size,
                            timeout=timeout)
    return True
