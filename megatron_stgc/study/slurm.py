"""``--launcher slurm``: one sbatch script per run (and one for the once-stages), a collect
job, and OUTPUT/slurm/submit.sh that submits them in order: the runs after the once-job
(``--dependency=afterok``), the collect job after every run.

Each script runs its unfinished stages in order (a finished stage leaves ``<stage>.done``)
and is requeue-safe (``--requeue``, output appended): a requeued or resubmitted run skips
what finished and its training resumes from the --save checkpoint its command loads.
torchrun stages run one agent per node (``srun --ntasks-per-node=1``) meeting at a c10d
rendezvous on the job's first node. ``DRY_RUN=1 bash SCRIPT`` prints each stage's command
instead of running it (HEAD_NODE and SLURM_JOB_ID may be set by hand for that).

Grid file::

    slurm:
      sbatch: [--partition=gpu, --account=me]        # every job
      train_sbatch: [--gpus-per-node=8, --time=24:00:00, --exclusive]  # once + run jobs
      setup: ["source /shared/venv/bin/activate"]    # shell lines before the stages
"""

from __future__ import annotations

import os
import shlex
import sys

from megatron_stgc.study.plan import REPO, Job, Step, Study

RUN_STAGE = r'''
run_stage() {  # run_stage MARKER LOG COMMAND...: skipped once MARKER exists
  local marker=$1 log=$2; shift 2
  if [[ -f "$marker" ]]; then echo "study: $(basename "$marker" .done): done before"; return 0; fi
  if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "$@"; echo; return 0; fi
  local start=$SECONDS
  echo "study: $(basename "$marker" .done) (output also in $log)"
  "$@" 2>&1 | tee -a "$log"
  echo "$((SECONDS - start))" > "$marker.tmp" && mv "$marker.tmp" "$marker"
}
'''


def slurm_dir(study: Study) -> str:
    return os.path.join(study.output, "slurm")


def _header(study: Study, job_name: str, nodes: int, extra: list[str], about: str) -> list[str]:
    logs = os.path.join(slurm_dir(study), "logs")
    lines = ["#!/usr/bin/env bash", f"# {about}",
             "# written by megatron-stgc study --launcher slurm; resubmitting is safe: "
             "finished stages are skipped",
             f"#SBATCH --job-name={job_name}", f"#SBATCH --nodes={nodes}",
             "#SBATCH --ntasks-per-node=1", f"#SBATCH --output={logs}/%x-%j.out",
             "#SBATCH --open-mode=append", "#SBATCH --requeue"]
    lines += [f"#SBATCH {option}" for option in extra]
    lines += ["set -euo pipefail", f"cd {shlex.quote(study.workdir)}",
              f'export PYTHONPATH={shlex.quote(REPO)}${{PYTHONPATH:+:$PYTHONPATH}}']
    lines += [f"export {key}={shlex.quote(value)}" for key, value in study.env.items()]
    lines += list(study.slurm.get("setup") or [])
    return lines


def step_command(step: Step, index: int, max_restarts: int) -> str:
    """The srun line of one stage (shell-quoted; the rendezvous host/port/id stay variables)."""
    if not step.torchrun:
        command = step.argv if step.shell is None else ["bash", "-c", step.shell]
        return "srun --nodes=1 --ntasks=1 " + shlex.join(command)
    nodes = step.nnodes
    return (f"srun --nodes={nodes} --ntasks={nodes} --ntasks-per-node=1 --kill-on-bad-exit=1 "
            f"{shlex.quote(sys.executable)} -m torch.distributed.run --nnodes {nodes} "
            f"--nproc-per-node {step.nproc_per_node} --rdzv-backend c10d "
            f'--rdzv-endpoint "$HEAD_NODE:$((RDZV_PORT + {index}))" '
            f'--rdzv-id "$SLURM_JOB_ID-{step.stage}" --max-restarts {max_restarts} '
            + shlex.join(step.argv))


def job_script(study: Study, job: Job, job_name: str, extra: list[str], about: str) -> str:
    lines = _header(study, job_name, job.nodes, extra, about)
    lines += ['HEAD_NODE=${HEAD_NODE:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | '
              'head -n 1)}',
              "RDZV_PORT=${RDZV_PORT:-$((20000 + SLURM_JOB_ID % 10000))}",
              f"mkdir -p {shlex.quote(job.directory)}", RUN_STAGE]
    for index, step in enumerate(job.steps):
        lines.append(f"run_stage {shlex.quote(step.marker)} {shlex.quote(step.log)} "
                     + step_command(step, index, study.max_restarts))
    return "\n".join(lines) + "\n"


def collect_script(study: Study, extra: list[str]) -> str:
    lines = _header(study, "study-collect", 1, extra,
                    f"collect: aggregate {study.output}/runs into runs.csv, summary.csv, plots")
    lines.append(f"srun --nodes=1 --ntasks=1 {shlex.quote(sys.executable)} -m megatron_stgc "
                 f"study --collect --output {shlex.quote(study.output)}")
    return "\n".join(lines) + "\n"


def _write(path: str, text: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
    return path


def submit_script(study: Study, once: str | None, runs: list[str], collect: str) -> str:
    logs = os.path.join(slurm_dir(study), "logs")
    lines = ["#!/usr/bin/env bash",
             f"# Submits the study {study.output} ({study.grid_file}): "
             + ("the once-job, then " if once else "") + f"{len(runs)} unfinished runs, then "
             "the collect job after all of them.",
             "# written by megatron-stgc study --launcher slurm; SBATCH=... for another "
             "sbatch command", "set -euo pipefail", 'SBATCH=${SBATCH:-sbatch}',
             f"mkdir -p {shlex.quote(logs)}",
             'submit() { local id; id=$("$SBATCH" --parsable "$@"); echo "${id%%;*}"; }',
             "AFTER=()"]
    if once:
        lines += [f"ONCE=$(submit {shlex.quote(once)})", 'echo "study: once-job $ONCE"',
                  'AFTER=(--dependency=afterok:$ONCE)']
    lines.append("RUNS=()")
    lines += [f'RUNS+=("$(submit ${{AFTER[@]+"${{AFTER[@]}}"}} {shlex.quote(path)})")'
              for path in runs]
    lines += ['if ((${#RUNS[@]})); then',
              '  AFTER=(--dependency=afterok:$(IFS=:; echo "${RUNS[*]}"))', 'fi',
              f'COLLECT=$(submit ${{AFTER[@]+"${{AFTER[@]}}"}} {shlex.quote(collect)})',
              'echo "study: ${#RUNS[@]} run jobs (${RUNS[*]:-none}), collect job $COLLECT"']
    return "\n".join(lines) + "\n"


def write_slurm(study: Study, extra_sbatch: list[str], say=print) -> str:
    """Write every script; returns submit.sh's path."""
    directory = slurm_dir(study)
    os.makedirs(os.path.join(directory, "logs"), exist_ok=True)  # SLURM does not create it
    every = list(study.slurm.get("sbatch") or []) + list(extra_sbatch)
    train = every + list(study.slurm.get("train_sbatch") or [])
    once = None
    if study.once is not None:
        path = _write(os.path.join(directory, "once.sbatch"), job_script(
            study, study.once, "study-once", train,
            f"once-stages: {', '.join(s.stage for s in study.once.steps)}"))
        once = None if study.once.finished() else path
    runs = []
    for job in study.runs:
        name = f"{job.point}-seed{job.seed}"
        path = _write(os.path.join(directory, "runs", f"{name}.sbatch"), job_script(
            study, job, f"study-{name}", train,
            f"run {job.point} seed {job.seed}: {', '.join(s.stage for s in job.steps)}"))
        if not job.finished():
            runs.append(path)
    collect = _write(os.path.join(directory, "collect.sbatch"), collect_script(study, every))
    submit = _write(os.path.join(directory, "submit.sh"), submit_script(study, once, runs,
                                                                         collect))
    say(f"study: wrote {len(study.runs)} run scripts ({len(study.runs) - len(runs)} finished, "
        f"not submitted), {'a once-job, ' if once else ''}a collect job; submit with: "
        f"bash {submit}")
    return submit
