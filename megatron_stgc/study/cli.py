"""``megatron-stgc study``: a seed-paired study from a grid file (docs/STUDY.md, "The tool").

    megatron-stgc study --grid examples/study/digits.yaml --output runs/study
    megatron-stgc study --grid my_grid.yaml --output /shared/study --launcher slurm --submit
    megatron-stgc study --collect --output /shared/study      # aggregate what has finished

Flags after ``--`` go to every command that uses ``{extra}`` (the presets: every train,
export and eval). A second call resumes: finished stages are not rerun.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Optional

from megatron_stgc.study.grid_file import StudyError, load_grid_file
from megatron_stgc.study.local import run_local
from megatron_stgc.study.plan import Study, build_study, load_study
from megatron_stgc.study.points import (all_points, baselines, parse_variations, select,
                                        split_values)
from megatron_stgc.study.report import write_report
from megatron_stgc.study.slurm import write_slurm


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-stgc study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--grid", help="the grid file (YAML; examples/study/)")
    parser.add_argument("--output", required=True, help="the study's directory")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local")
    parser.add_argument("--collect", action="store_true",
                        help="only aggregate the finished runs under --output (the SLURM "
                             "collect job runs this)")
    parser.add_argument("--seeds", help="comma list; replaces the grid file's seeds")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a placeholder's value (replaces vars: in the grid file)")
    parser.add_argument("--axis", action="append", default=[], metavar="NAME=V1,V2",
                        help="replace an axis's values (';'-separated when a value holds ',')")
    parser.add_argument("--variations", default=None, metavar="'A=1,B=2;C=3'",
                        help="more one-factor points: the axes not named take their first value")
    parser.add_argument("--points", default=None, help="comma list: run only these points "
                        "(and the baselines they are compared with)")
    parser.add_argument("--nnodes", type=int, help="default nodes per torchrun stage")
    parser.add_argument("--nproc-per-node", type=int, help="default processes per node")
    parser.add_argument("--jobs", type=int, default=1,
                        help="local: runs at a time (each its own GPUs with CUDA; timings "
                             "are only comparable at 1)")
    parser.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                        help="slurm: one more #SBATCH option for every job, e.g. "
                             "--sbatch=--partition=gpu")
    parser.add_argument("--submit", action="store_true", help="slurm: run submit.sh now")
    return parser


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise StudyError(f"{flag} {item!r}: expected NAME=VALUE")
        pairs[name.strip()] = value
    return pairs


def plan_from_args(args, extra: list[str], say=print) -> Study:
    spec = load_grid_file(args.grid)
    spec["grid_file"] = os.path.abspath(args.grid)
    sets = _pairs(args.set, "--set")
    if "base" in sets:  # another base config: for the commands and the point checks
        spec["base"] = sets["base"] = os.path.abspath(sets["base"])
    axes = {name: split_values(values) for name, values in _pairs(args.axis, "--axis").items()}
    points = all_points(spec, axes, parse_variations(args.variations or ""))
    baseline_of = baselines(points, spec.get("baseline"))
    if args.points:
        chosen = select(points, [p.strip() for p in args.points.split(",") if p.strip()],
                        baseline_of)
        points = {name: points[name] for name in chosen}
    sizes = {"nnodes": args.nnodes or int(spec.get("nnodes", 1)),
             "nproc_per_node": args.nproc_per_node or int(spec.get("nproc_per_node", 1))}
    if spec.get("base"):
        from megatron_stgc.study.validate import check_points

        world = lambda p: ({**sizes, **p.settings}["nnodes"]  # noqa: E731
                           * {**sizes, **p.settings}["nproc_per_node"])
        points = check_points(points, spec["base"], extra,
                              bool((spec.get("grid") or {}).get("skip_invalid")), world, say)
    baseline_of = {name: base if base in points else None
                   for name, base in baseline_of.items() if name in points}
    seeds_text = args.seeds or ",".join(str(s) for s in spec.get("seeds") or [1])
    try:
        seeds = [int(s) for s in seeds_text.split(",") if s.strip()]
    except ValueError:
        raise StudyError(f"--seeds / seeds: integers, got {seeds_text!r}") from None
    if len(set(seeds)) != len(seeds) or not seeds:
        raise StudyError(f"--seeds / seeds: distinct integers, got {seeds_text!r}")
    return build_study(spec, args.output, points, seeds, baseline_of, extra, sets, sizes)


def main(argv: Optional[list[str]] = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    try:
        if args.collect:
            text = write_report(load_study(args.output), set())
            print(text, flush=True)
            return 0
        if not args.grid:
            raise StudyError("--grid is required (or --collect)")
        if args.jobs < 1:
            raise StudyError(f"--jobs must be >= 1, got {args.jobs}")
        say = lambda message: print(message, flush=True)  # noqa: E731
        study = plan_from_args(args, extra, say)
        study.save()
        if args.launcher == "slurm":
            submit = write_slurm(study, args.sbatch, say)
            if args.submit:
                return subprocess.run(["bash", submit]).returncode
            return 0
        ran_now = run_local(study, args.jobs, say)
        print(write_report(study, ran_now, say), flush=True)
        return 0
    except StudyError as error:
        print(f"megatron-stgc study: {error}", file=sys.stderr)
        return 2
