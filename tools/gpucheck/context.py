"""What a check runs with: its device, work directory, log and one deadline for all of it."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

from gpucheck.processes import run_until
from gpucheck.tf32 import check_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Skip(Exception):
    """The check cannot run here; the message says why."""


@dataclass
class Context:
    name: str  # the check's name
    device: str  # "cuda" or "cpu"
    work: str  # a fresh directory for the check's files
    log: str  # the check's log file (every command's output)
    deadline: float  # time.monotonic() by which everything of the check has ended
    token: str  # marks every process the check starts (processes.py)
    gpus: int = 1  # processes for the multi-GPU checks

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, command: list[str], env: dict | None = None) -> None:
        """Run one command of the check under the check's deadline; raise on failure."""
        code = run_until(command, self.log, self.deadline, self.token, REPO,
                         env={"PYTHONWARNINGS": "ignore", **check_env(self.name), **(env or {})})
        if code != 0:
            with open(self.log) as f:
                tail = f.read()[-1500:]
            raise RuntimeError(f"exit code {code}: ...{tail}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], processes: int = 1) -> list[str]:
    """``python -m torch.distributed.run`` on this machine with ``processes`` workers."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
            "--master-port", str(free_port()), *args]


def stgc_command(command: str, flags: list[str], processes: int = 1) -> list[str]:
    """torchrun of ``megatron-stgc <command> <flags>``."""
    return torchrun(["-m", "megatron_stgc", command, *flags], processes)
