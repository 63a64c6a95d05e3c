"""Run a check's commands under one deadline; on expiry kill every process the check started.

torchrun starts each worker in a session of its own, so killing torchrun (or its process
group) leaves the workers holding the GPU. Every process a check starts carries a marker
in its environment (``GPU_CHECK_RUN=<token>``, inherited by torchrun's workers and their
children); on a timeout every process with the marker, and every descendant of the
command, is killed with SIGKILL, again until none is left (one that forked meanwhile is
found by its marker). Needs psutil (a dependency of the package).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid

import psutil

MARKER = "GPU_CHECK_RUN"


class DeadlineExceeded(Exception):
    """A command was still running at the check's deadline (it has been killed)."""


def new_token(name: str) -> str:
    return f"{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def marked(token: str) -> list[psutil.Process]:
    """Live processes whose environment carries ``MARKER=token`` (this user's)."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(MARKER) == token and \
                    process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_all(token: str, root_pid: int | None = None, rounds: int = 50) -> int:
    """SIGKILL every process of the check (marker or descendant of ``root_pid``) until none
    is alive; returns how many were killed."""
    killed = set()
    for _ in range(rounds):
        victims = {p.pid: p for p in marked(token)}
        if root_pid is not None:
            victims.update({p.pid: p for p in _descendants(root_pid)})
        alive = [p for pid, p in victims.items() if pid != os.getpid() and _alive(p)]
        if not alive:
            break
        for process in alive:
            try:
                process.send_signal(signal.SIGKILL)
                killed.add(process.pid)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=1.0)
    return len(killed)


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def run_until(command: list[str], log_path: str, deadline: float, token: str, cwd: str,
              env: dict | None = None) -> int:
    """Run ``command`` (output appended to ``log_path``) until it exits or ``deadline``
    (time.monotonic()); returns its exit code, or kills the check's processes and raises
    DeadlineExceeded."""
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                   env={**os.environ, **(env or {}), MARKER: token},
                                   start_new_session=True)
        try:
            return process.wait(timeout=max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            kill_all(token, process.pid)
            process.wait()
            raise DeadlineExceeded(" ".join(command[:6])) from None
