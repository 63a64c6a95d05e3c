"""A study's plan: the once-job (stages with ``scope: once``, e.g. data + stage II) and one
job per (point, seed) (stages with ``scope: run``, e.g. stage III + eval), every command with
its placeholders filled. Saved as OUTPUT/study.json; the collect step reads it back.

Stages in the grid file (run in this order; a finished stage leaves ``<stage>.done`` holding
its seconds and is never rerun)::

    stages:
      stage2: {scope: once, torchrun: true, command: [-m, megatron_stgc, train, "{flags}"]}
      subset: {scope: once, shell: "head -n 10 {questions} > {output}/q10.jsonl"}
      train:  {scope: run, torchrun: true, command: [...], nproc_per_node: 2, nnodes: 1}

``torchrun: true`` launches the command under torchrun (``python -m torch.distributed.run
... <command>``: locally ``--standalone``, on SLURM one agent per node with a c10d
rendezvous on the first node); otherwise it runs as one process. Built-in placeholders:
output, workdir, grid_dir, base, repo, python, extra (the flags after ``--``), and in run
stages point, seed, run_dir, run_name, point_flags.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_stgc.study.grid_file import StudyError
from megatron_stgc.study.points import SETTINGS, Point, text
from megatron_stgc.study.templates import Templates

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGE_KEYS = {"scope", "torchrun", "command", "shell", *SETTINGS}
REPORT_DEFAULTS = {"score_file": "results.json", "log_file": "train_log.jsonl",
                   "metrics": {"last_steps": 20, "reduce": "mean"},
                   "compare": {"acc_*": "difference"}, "summary_columns": None,
                   "plot": {"bars": None, "compare": None, "analysis": True}}


@dataclass
class Step:
    """One stage of one job, ready to launch."""
    stage: str
    argv: list[str]  # the command (after the torchrun prefix when torchrun); [] for shell
    shell: Optional[str]
    torchrun: bool
    nnodes: int
    nproc_per_node: int
    log: str
    marker: str

    def done(self) -> bool:
        return os.path.isfile(self.marker)


@dataclass
class Job:
    name: str  # "once" or "<point>/seed<seed>"
    directory: str
    steps: list[Step]
    point: Optional[str] = None
    seed: Optional[int] = None

    def finished(self) -> bool:
        return all(step.done() for step in self.steps)

    @property
    def nodes(self) -> int:
        return max([s.nnodes for s in self.steps if s.torchrun] or [1])


@dataclass
class Study:
    output: str
    workdir: str
    env: dict[str, str]
    max_restarts: int
    points: dict[str, Point]
    seeds: list[int]
    baseline_of: dict[str, Optional[str]]
    once: Optional[Job]
    runs: list[Job]
    report: dict[str, Any]
    slurm: dict[str, Any] = field(default_factory=dict)
    grid_file: str = ""

    def save(self) -> str:
        os.makedirs(self.output, exist_ok=True)
        path = os.path.join(self.output, "study.json")
        with open(path + ".tmp", "w") as f:
            json.dump(dataclasses.asdict(self), f, indent=1)
        os.replace(path + ".tmp", path)
        return path


def load_study(output: str) -> Study:
    path = os.path.join(os.path.abspath(output), "study.json")
    if not os.path.isfile(path):
        raise StudyError(f"--output {output}: no study.json (written when a study is launched "
                         "with --grid)")
    with open(path) as f:
        raw = json.load(f)
    return Study(**{**raw, "points": {n: Point(**p) for n, p in raw["points"].items()},
                    "once": _job(raw["once"]), "runs": [_job(j) for j in raw["runs"]]})


def _job(raw: Optional[dict]) -> Optional[Job]:
    return None if raw is None else Job(**{**raw, "steps": [Step(**s) for s in raw["steps"]]})


def run_dir(output: str, point: str, seed: int) -> str:
    return os.path.join(output, "runs", point, f"seed{seed}")


def _variables(spec: dict, output: str, workdir: str, python: str, extra: list[str],
               overrides: dict[str, str]) -> dict[str, Any]:
    variables: dict[str, Any] = {"output": output, "workdir": workdir, "repo": REPO,
                                 "grid_dir": os.path.dirname(spec.get("grid_file", output)),
                                 "python": python, "extra": list(extra)}
    if spec.get("base"):
        variables["base"] = spec["base"]
    for name, value in (spec.get("vars") or {}).items():
        if isinstance(value, dict):
            raise StudyError(f"vars.{name}: a string or a list, got a mapping")
        variables[name] = [text(v) for v in value] if isinstance(value, list) else text(value)
    variables.update(overrides)
    return variables


def _stage_specs(spec: dict) -> list[tuple[str, dict]]:
    stages = spec.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise StudyError("stages: expected {name: {scope, command | shell, ...}}, one at least")
    for name, stage in stages.items():
        where = f"stages.{name}"
        if not isinstance(stage, dict):
            raise StudyError(f"{where}: expected a mapping")
        unknown = set(stage) - STAGE_KEYS
        if unknown:
            raise StudyError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: "
                             f"{', '.join(sorted(STAGE_KEYS))}")
        if stage.get("scope", "run") not in ("once", "run"):
            raise StudyError(f"{where}.scope: 'once' or 'run', got {stage.get('scope')!r}")
        if ("command" in stage) == ("shell" in stage):
            raise StudyError(f"{where}: exactly one of command (argv) and shell (a bash line)")
        if "shell" in stage and stage.get("torchrun"):
            raise StudyError(f"{where}: a torchrun stage takes a command, not a shell line")
    return list(stages.items())


def _step(name: str, stage: dict, templates: Templates, directory: str,
          defaults: dict[str, int]) -> Step:
    sizes = {key: int(stage.get(key, defaults[key])) for key in SETTINGS}
    argv = [] if "shell" in stage else templates.tokens(stage["command"])
    shell = templates.shell(stage["shell"]) if "shell" in stage else None
    return Step(name, argv, shell, bool(stage.get("torchrun")), sizes["nnodes"],
                sizes["nproc_per_node"], os.path.join(directory, f"{name}.out"),
                os.path.join(directory, f"{name}.done"))


def report_settings(spec: dict) -> dict[str, Any]:
    report = {key: spec.get(key, default) for key, default in REPORT_DEFAULTS.items()}
    report["metrics"] = {**REPORT_DEFAULTS["metrics"], **(spec.get("metrics") or {})}
    report["plot"] = {**REPORT_DEFAULTS["plot"], **(spec.get("plot") or {})}
    if report["metrics"]["reduce"] not in ("mean", "median"):
        raise StudyError(f"metrics.reduce: 'mean' or 'median', got {report['metrics']['reduce']!r}")
    if int(report["metrics"]["last_steps"]) < 1:
        raise StudyError("metrics.last_steps: must be >= 1")
    for pattern, kind in (report["compare"] or {}).items():
        if kind not in ("difference", "ratio"):
            raise StudyError(f"compare.{pattern}: 'difference' or 'ratio', got {kind!r}")
    return report


def build_study(spec: dict, output: str, points: dict[str, Point], seeds: list[int],
                baseline_of: dict[str, Optional[str]], extra: list[str],
                overrides: dict[str, str], sizes: dict[str, int]) -> Study:
    """The plan of ``points`` x ``seeds``; ``sizes``: default nnodes / nproc_per_node."""
    output = os.path.abspath(output)
    workdir = spec.get("workdir") or os.getcwd()
    variables = _variables(spec, output, workdir, sys.executable, extra, overrides)
    stages = _stage_specs(spec)
    once_dir = os.path.join(output, "once")
    once_steps = [_step(name, stage, Templates(variables, f"stages.{name}"), once_dir, sizes)
                  for name, stage in stages if stage.get("scope", "run") == "once"]
    runs = []
    for seed in seeds:
        for point in points.values():
            directory = run_dir(output, point.name, seed)
            run_vars = dict(variables, point=point.name, seed=str(seed), run_dir=directory,
                            run_name=f"{point.name}-seed{seed}", point_flags=list(point.flags))
            where = f"point {point.name} seed {seed}"
            steps = [_step(name, stage, Templates(run_vars, f"stages.{name} ({where})"),
                           directory, {**sizes, **point.settings})
                     for name, stage in stages if stage.get("scope", "run") == "run"]
            runs.append(Job(f"{point.name}/seed{seed}", directory, steps, point.name, seed))
    env = {key: text(value) for key, value in (spec.get("env") or {}).items()}
    return Study(output, workdir, env, int(spec.get("max_restarts", 0)), points, seeds,
                 baseline_of, Job("once", once_dir, once_steps) if once_steps else None, runs,
                 report_settings(spec), spec.get("slurm") or {}, spec.get("grid_file", ""))
