"""``--launcher local``: the study's stages on this machine, torchrun stages with
``torchrun --standalone`` (one node; a one-process stage without restarts runs as
``python <command>``, megatron-stgc making its own one-rank group). The once-job first, then the runs, ``--jobs`` of them at
a time (each with its own GPUs when CUDA is present: CUDA_VISIBLE_DEVICES is split between
the concurrent runs). A finished stage (its ``.done`` file) is not rerun; a training stage
that was interrupted resumes from its --save checkpoint when its command passes --load.
Progress (runs done, minutes left) on the console; each stage's output in its ``.out`` file.
"""

from __future__ import annotations

import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

from megatron_stgc.study.grid_file import StudyError
from megatron_stgc.study.plan import REPO, Job, Step, Study

QUIET_PREFIXES = ("[W", "W1", "/")  # torch / megatron warnings, kept in the .out file only


def local_command(step: Step, max_restarts: int) -> list[str]:
    if step.shell is not None:
        return ["bash", "-c", step.shell]
    if not step.torchrun:
        return list(step.argv)
    if step.nnodes != 1:
        raise StudyError(f"stage {step.stage}: nnodes {step.nnodes}; --launcher local runs on "
                         "this machine only (--launcher slurm for several nodes)")
    if step.nproc_per_node == 1 and max_restarts == 0:
        # one process: python itself, no torchrun agent (megatron-stgc makes its own
        # one-rank group); saves the agent's start-up on every short run
        return [sys.executable] + step.argv
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc-per-node", str(step.nproc_per_node), "--max-restarts",
            str(max_restarts)] + step.argv


def base_env(study: Study) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    env.update(study.env)
    return env


def mark_done(step: Step, seconds: float) -> None:
    with open(step.marker + ".tmp", "w") as f:
        f.write(f"{seconds:.1f}\n")
    os.replace(step.marker + ".tmp", step.marker)


def run_step(step: Step, study: Study, env: dict[str, str], echo: bool, say) -> None:
    command = local_command(step, study.max_restarts)
    os.makedirs(os.path.dirname(step.log), exist_ok=True)
    say("$ " + " ".join(command))
    start = time.perf_counter()
    with open(step.log, "w") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, env=env, cwd=study.workdir)
        for line in process.stdout:
            log.write(line)
            if echo and not line.startswith(QUIET_PREFIXES) and "warn" not in line.lower():
                say("  " + line.rstrip("\n"))
        code = process.wait()
    if code != 0:
        with open(step.log) as f:
            tail = "".join(f.readlines()[-15:])
        raise StudyError(f"stage {step.stage} failed (exit code {code}); its output: "
                         f"{step.log}\n{tail}")
    mark_done(step, time.perf_counter() - start)


def run_job(job: Job, study: Study, env: dict[str, str], echo: bool, say) -> bool:
    """Run the job's unfinished stages in order; True when any ran."""
    ran = False
    for step in job.steps:
        if step.done():
            continue
        try:
            run_step(step, study, env, echo, say)
        except StudyError as error:
            raise StudyError(f"{job.name}: {error}") from None
        ran = True
    return ran


def gpu_slots(jobs: int, nproc: int) -> list[Optional[str]]:
    """CUDA_VISIBLE_DEVICES of each concurrent run (None without CUDA)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        import torch

        count = torch.cuda.device_count()
    except ImportError:
        count = 0
    if count == 0:
        return [None] * jobs
    devices = visible.split(",") if visible else [str(i) for i in range(count)]
    if jobs * nproc > len(devices):
        raise StudyError(f"--jobs {jobs} x {nproc} processes per run needs {jobs * nproc} GPUs; "
                         f"{len(devices)} visible")
    return [",".join(devices[i * nproc:(i + 1) * nproc]) for i in range(jobs)]


def run_local(study: Study, jobs: int = 1, say: Callable[[str], None] = print) -> set[str]:
    """Run everything unfinished; returns the names of the runs that ran in this call."""
    env = base_env(study)
    lock = threading.Lock()

    def locked_say(message: str) -> None:
        with lock:
            say(message)

    if study.once is not None:
        state = "done before" if study.once.finished() else "running"
        say(f"study: once-stages ({', '.join(s.stage for s in study.once.steps)}): {state}")
        run_job(study.once, study, env, True, say)
    total, ran_now, fresh_seconds = len(study.runs), set(), []
    say(f"study: {len(study.points)} points x {len(study.seeds)} seeds = {total} runs "
        f"({sum(j.finished() for j in study.runs)} finished before), {jobs} at a time")
    nproc = max([s.nproc_per_node for j in study.runs for s in j.steps if s.torchrun] or [1])
    slots: queue.Queue = queue.Queue()
    for slot in gpu_slots(jobs, nproc):
        slots.put(slot)
    done_count = [0]
    failed = threading.Event()  # after a failure no further run starts

    def one(job: Job) -> None:
        if failed.is_set():
            return
        slot = slots.get()
        began = time.perf_counter()
        try:
            job_env = env if slot is None else dict(env, CUDA_VISIBLE_DEVICES=slot)
            ran = run_job(job, study, job_env, jobs == 1, locked_say)
        except StudyError:
            failed.set()
            raise
        finally:
            slots.put(slot)
        with lock:
            done_count[0] += 1
            if ran:
                ran_now.add(job.name)
                fresh_seconds.append(time.perf_counter() - began)
            left = total - done_count[0]
            eta = statistics.fmean(fresh_seconds) * left / jobs if fresh_seconds else 0.0
            say(f"study: [{done_count[0]}/{total}] {job.point} seed {job.seed} "
                f"({'ran' if ran else 'done before'}); about {eta / 60:.0f} min left")

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(one, job) for job in study.runs]
        errors = []
        for future in futures:
            try:
                future.result()
            except StudyError as error:
                errors.append(error)
    if errors:
        raise errors[0]
    return ran_now
