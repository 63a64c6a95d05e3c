"""Helpers for tests that launch real torchrun jobs of ``megatron_stgc train``.

Every job runs in its own session (process group): on a timeout or a failed
assertion the whole group (agent and workers) is killed. Ports are free ports
on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Optional

from megatron_stgc.parallel import free_port  # noqa: F401  (re-exported for the tests)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "examples", "tiny_moe_cpu.yaml")

# The tiny main job: 2 layers (MoE on layer 2), hidden 32, 4 experts top-2, EP=2,
# global batch 8 (2 micro-batches of 2 per DP rank on 2 ranks), embedded data.
TINY_FLAGS = ["--config", EXAMPLE, "--num-layers", "2", "--hidden-size", "32",
              "--ffn-hidden-size", "64", "--moe-ffn-hidden-size", "32", "--seq-length", "32",
              "--micro-batch-size", "2", "--global-batch-size", "8", "--num-samples", "400",
              "--vocab-size", "128", "--lr-warmup-fraction", "0", "--log-interval", "1"]
GLOBAL_BATCH = 8


def torchrun_command(train_flags: list[str], nnodes: int = 1, nproc_per_node: int = 2,
                     port: Optional[int] = None, node_rank: Optional[int] = None,
                     max_restarts: int = 0, rdzv_id: str = "stgc-test") -> list[str]:
    """``python -m torch.distributed.run`` with c10d rendezvous on 127.0.0.1."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
               "--nproc-per-node", str(nproc_per_node), "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port or free_port()}", "--rdzv-id", rdzv_id,
               "--local-addr", "127.0.0.1", "--max-restarts", str(max_restarts),
               "--monitor-interval", "0.5"]
    if node_rank is not None:
        command += ["--node-rank", str(node_rank)]
    return command + ["-m", "megatron_stgc", "train", *train_flags]


class Job:
    """One launched command in its own process group, output to ``output_path``."""

    def __init__(self, command: list[str], output_path: str, env: Optional[dict] = None):
        self.command = command
        self.output_path = output_path
        self._output = open(output_path, "w")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(env or {}))
        self.process = subprocess.Popen(command, stdout=self._output, stderr=subprocess.STDOUT,
                                        cwd=REPO, env=env, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        if not self._output.closed:
            self._output.flush()
        with open(self.output_path) as f:
            return f.read()

    def kill_group(self) -> None:
        """SIGKILL the agent's process group and every descendant (torchrun starts
        its workers in sessions of their own)."""
        import psutil

        try:
            descendants = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for child in descendants:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        self.process.wait()
        self._output.close()

    def wait(self, timeout: float) -> int:
        """Exit code; kills the process group and raises on timeout."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            raise AssertionError(f"timed out after {timeout}s: {' '.join(self.command)}\n"
                                 + self.output()[-4000:])
        self._output.close()
        return code

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.kill_group()


def run_job(command: list[str], output_path: str, timeout: float = 240) -> str:
    """Run to completion; assert exit code 0; return the output."""
    with Job(command, output_path) as job:
        code = job.wait(timeout)
        assert code == 0, f"exit code {code}\n" + job.output()[-6000:]
        return job.output()


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            if line.endswith("\n"):  # a line being written is not complete yet
                records.append(json.loads(line))
    return records


def final_records(records: list[dict]) -> list[dict]:
    """The last record written for each iteration (a resumed run rewrites some), in order."""
    by_iteration = {}
    for record in records:
        by_iteration[record["iteration"]] = record
    return [by_iteration[i] for i in sorted(by_iteration)]


def wait_for_iteration(path: str, iteration: int, job: Job, timeout: float) -> int:
    """Poll the JSONL log until it holds ``iteration``; returns the newest iteration seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = read_jsonl(path)
        if records and records[-1]["iteration"] >= iteration:
            return records[-1]["iteration"]
        if job.process.poll() is not None:
            raise AssertionError(f"job ended before iteration {iteration}\n" + job.output()[-4000:])
        time.sleep(0.02)
    raise AssertionError(f"iteration {iteration} not logged within {timeout}s\n"
                         + job.output()[-4000:])


def worker_pid(agent_pid: int, rank: int) -> int:
    """PID of the torchrun worker with global RANK ``rank`` under the agent ``agent_pid``."""
    import psutil

    for child in psutil.Process(agent_pid).children(recursive=True):
        try:
            environ = child.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if environ.get("RANK") == str(rank) and "TORCHELASTIC_RUN_ID" in environ:
            return child.pid
    raise AssertionError(f"no worker with RANK={rank} under agent {agent_pid}")
