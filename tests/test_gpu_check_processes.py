"""The GPU check's deadline: one per check, and at it every process the check started dies.

torchrun starts each worker in a session of its own; a worker may start more (in sessions
of their own too). A fake job check here launches such a worker with real torchrun (and,
quicker to start, with a plain launcher that does what torchrun does) that sleeps 300 s
past its limit (5 s; 30 s for torchrun, whose agent takes seconds to start a worker): the
check must fail at its limit, and no process it started may survive.
"""

from __future__ import annotations

import os
import sys
import time

import psutil
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPO, "tools")]

import gpu_check  # noqa: E402
from gpucheck import jobs  # noqa: E402
from gpucheck.context import torchrun  # noqa: E402
from gpucheck.processes import MARKER  # noqa: E402

WORKER = """
import os, subprocess, sys, time
# a grandchild in a session of its own, as a data-loader worker or a daemon might be
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                         start_new_session=True)
with open(os.path.join(os.environ["PID_DIR"], str(os.getpid())), "w") as f:
    f.write(str(child.pid))
time.sleep(float(os.environ.get("WORKER_SECONDS", "300")))
"""
# what torchrun does with its workers: a new session each
LAUNCHER = """
import subprocess, sys
subprocess.Popen([sys.executable, sys.argv[1]], start_new_session=True).wait()
"""

# starts the worker, waits until it has written its pid file, and exits: the worker stays
DETACHED = """
import os, subprocess, sys, time
worker = subprocess.Popen([sys.executable, sys.argv[1]], start_new_session=True)
path = os.path.join(os.environ["PID_DIR"], str(worker.pid))
while not os.path.exists(path) or not open(path).read():
    time.sleep(0.05)
"""
LAUNCHERS = {"plain": LAUNCHER, "detach": DETACHED}


def _job(launcher: str, worker_seconds: float):
    def job(ctx):
        worker = os.path.join(ctx.work, "worker.py")
        with open(worker, "w") as f:
            f.write(WORKER)
        if launcher == "torchrun":
            command = torchrun([worker])
        else:
            command = [sys.executable, "-c", LAUNCHERS[launcher], worker]
        ctx.run(command, env={"PID_DIR": ctx.work, "WORKER_SECONDS": str(worker_seconds)})
        return "worker done"

    return job


def _started_pids(work_dirs) -> list[int]:
    pids = []
    for work in work_dirs:
        for name in os.listdir(work):
            if name.isdigit():
                with open(os.path.join(work, name)) as f:
                    pids += [int(name), int(f.read())]
    return pids


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _marked_survivors(prefix: str) -> list[int]:
    survivors = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(MARKER, "").startswith(prefix) and _alive(process.pid):
                survivors.append(process.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return survivors


@pytest.fixture
def fake_check(monkeypatch, tmp_path):
    works = []
    original = gpu_check.tempfile.mkdtemp

    def mkdtemp(prefix=""):
        works.append(original(prefix=prefix, dir=tmp_path))
        return works[-1]

    monkeypatch.setattr(gpu_check.tempfile, "mkdtemp", mkdtemp)

    def run(name, launcher, worker_seconds, limit):
        monkeypatch.setitem(jobs.CHECKS, name, _job(launcher, worker_seconds))
        start = time.monotonic()
        outcome = gpu_check.run_check(name, "cpu", str(tmp_path),
                                      budget_end=time.monotonic() + 3600, limit=limit)
        return outcome, time.monotonic() - start, works

    return run


@pytest.mark.parametrize("launcher,limit", [("plain", 5), ("torchrun", 30)])
def test_a_check_past_its_limit_is_killed_with_every_process_it_started(fake_check, launcher,
                                                                        limit):
    """torchrun gets 30 s: its agent alone needed ~10 s to start a worker on a busy 2-core
    machine, and the worker must be running when the limit strikes."""
    outcome, seconds, works = fake_check(f"sleepy-{launcher}", launcher, 300, limit=limit)
    assert outcome["status"] == "failed", outcome
    assert f"over its {limit} s limit" in outcome["detail"]
    assert seconds < limit + 30, f"the check took {seconds:.0f} s: it waited for its worker"
    pids = _started_pids(works)
    assert len(pids) == 2, "the worker (and its grandchild) had started"
    assert [pid for pid in pids if _alive(pid)] == []
    assert _marked_survivors(f"sleepy-{launcher}") == []


def test_processes_left_behind_by_a_passing_check_are_killed_and_named(fake_check):
    """The launcher returns at once; its worker (own session) would keep running."""
    outcome, _, works = fake_check("leftover", "detach", 300, limit=60)
    assert outcome["status"] == "passed", outcome
    assert "leftover processes of the check killed" in outcome["detail"]
    assert [pid for pid in _started_pids(works) if _alive(pid)] == []
