"""Scaling study: throughput and STGC overhead over a grid of layouts and MoE settings.

Each grid point is a real ``torchrun ... -m megatron_stgc train`` job on this machine
(small shapes from examples/tiny_moe_cpu.yaml unless overridden); the per-step
``tokens_per_second`` of its JSONL log (median over the steps after warm-up) is the
throughput. STGC overhead = 1 - throughput(STGC variant) / throughput(same point,
STGC off). Writes a CSV (one row per grid point) and a PNG with both panels.

    python tools/scaling_study.py --quick --out-dir docs --name scaling_cpu
    python tools/scaling_study.py --world-sizes 1,2,4 --steps 12 --out-dir runs/scaling

Grid dimensions: world size (-> DP), expert-parallel size, number of experts,
top-k, STGC off / on, --stgc-mode, --stgc-estimator. ``--quick`` is a fixed grid
of 13 jobs that finishes in a few minutes on 2 CPU cores. Numbers measured on CPU
(gloo, shared cores) say nothing about GPU speed; the plot says so.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_CONFIG = os.path.join(REPO, "examples", "tiny_moe_cpu.yaml")


@dataclass(frozen=True)
class Point:
    world: int
    ep: int
    experts: int
    topk: int
    stgc: str = "off"  # "off" or "<mode>/<estimator>"

    @property
    def dp(self) -> int:
        return self.world  # TP = 1: DP = world; EP is carved out of DP (megatron-core)

    @property
    def group(self) -> str:
        return f"W{self.world} DP{self.dp} EP{self.ep}\nE{self.experts} top{self.topk}"

    def flags(self) -> list[str]:
        flags = ["--expert-model-parallel-size", str(self.ep), "--num-experts",
                 str(self.experts), "--moe-router-topk", str(self.topk)]
        if self.stgc != "off":
            mode, estimator = self.stgc.split("/")
            flags += ["--stgc", "--stgc-mode", mode, "--stgc-estimator", estimator]
        return flags


@dataclass
class Result:
    point: Point
    tokens_per_second: float
    step_time_s: float
    final_loss: float
    conflict_fraction: Optional[float]
    wall_s: float
    overhead: Optional[float] = None
    extra: dict = field(default_factory=dict)


STGC_VARIANTS = ("single-pass/exact", "single-pass/lowrank", "single-pass/fc2",
                 "two-pass/exact")


def quick_grid() -> list[Point]:
    points = []
    for world, ep in ((1, 1), (2, 1), (2, 2)):
        points.append(Point(world, ep, 4, 2))
        points.append(Point(world, ep, 4, 2, "single-pass/exact"))
    points += [Point(2, 2, 4, 2, v) for v in STGC_VARIANTS[1:]]
    points += [Point(2, 2, 8, 2), Point(2, 2, 8, 2, "single-pass/exact")]
    points += [Point(2, 2, 4, 3), Point(2, 2, 4, 3, "single-pass/exact")]
    return points


def full_grid(world_sizes: list[int], experts: list[int], topks: list[int]) -> list[Point]:
    points = []
    for world in world_sizes:
        for ep in (e for e in (1, 2, 4, 8) if e <= world and world % e == 0):
            for n_experts in experts:
                if n_experts % ep:
                    continue
                for topk in topks:
                    if topk > n_experts or topk < 2:  # top-1 needs pre-softmax routing
                        continue
                    points.append(Point(world, ep, n_experts, topk))
                    points += [Point(world, ep, n_experts, topk, v) for v in STGC_VARIANTS]
    return points


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_point(point: Point, steps: int, warmup: int, work_dir: str, cache_dir: str,
              extra_flags: list[str], timeout: float) -> Result:
    log = os.path.join(work_dir, f"{abs(hash(point))}.jsonl")
    if os.path.exists(log):
        os.remove(log)
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
               "--nproc-per-node", str(point.world), "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--local-addr", "127.0.0.1",
               "-m", "megatron_stgc", "train", "--config", BASE_CONFIG,
               "--save", "none", "--load", "none", "--save-interval", "none",
               "--train-iters", str(steps), "--log-interval", "1",
               "--log-file", log, "--cache-dir", cache_dir, *point.flags(), *extra_flags]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env, cwd=REPO, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(process)
        raise RuntimeError(f"{point}: timed out after {timeout}s")
    if process.returncode != 0:
        raise RuntimeError(f"{point}: exit code {process.returncode}\n{output[-4000:]}")
    with open(log) as f:
        records = [json.loads(line) for line in f]
    timed = records[warmup:] or records
    conflict = [r["stgc/conflict_fraction"] for r in timed if "stgc/conflict_fraction" in r]
    return Result(point,
                  tokens_per_second=statistics.median(r["tokens_per_second"] for r in timed),
                  step_time_s=statistics.median(r["step_time_s"] for r in timed),
                  final_loss=records[-1]["loss"],
                  conflict_fraction=statistics.mean(conflict) if conflict else None,
                  wall_s=time.perf_counter() - start)


def _kill_tree(process: subprocess.Popen) -> None:
    try:
        import psutil

        children = psutil.Process(process.pid).children(recursive=True)
    except Exception:  # psutil missing or the process is gone
        children = []
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in children:
        try:
            child.kill()
        except Exception:
            pass
    process.wait()


def add_overheads(results: list[Result]) -> None:
    baseline = {(r.point.world, r.point.ep, r.point.experts, r.point.topk): r
                for r in results if r.point.stgc == "off"}
    for r in results:
        base = baseline.get((r.point.world, r.point.ep, r.point.experts, r.point.topk))
        if r.point.stgc != "off" and base is not None:
            r.overhead = 1.0 - r.tokens_per_second / base.tokens_per_second


CSV_FIELDS = ["world", "dp", "ep", "experts", "topk", "stgc", "tokens_per_second",
              "step_time_s", "stgc_overhead", "final_loss", "conflict_fraction", "wall_s"]


def write_csv(results: list[Result], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in results:
            row = dict(asdict(r.point), dp=r.point.dp, tokens_per_second=round(r.tokens_per_second, 1),
                       step_time_s=round(r.step_time_s, 4),
                       stgc_overhead="" if r.overhead is None else round(r.overhead, 4),
                       final_loss=round(r.final_loss, 4),
                       conflict_fraction="" if r.conflict_fraction is None
                       else round(r.conflict_fraction, 4),
                       wall_s=round(r.wall_s, 1))
            writer.writerow(row)


def read_csv(path: str) -> list[Result]:
    results = []
    with open(path) as f:
        for row in csv.DictReader(f):
            point = Point(int(row["world"]), int(row["ep"]), int(row["experts"]),
                          int(row["topk"]), row["stgc"])
            results.append(Result(
                point, float(row["tokens_per_second"]), float(row["step_time_s"]),
                float(row["final_loss"]),
                float(row["conflict_fraction"]) if row["conflict_fraction"] else None,
                float(row["wall_s"]),
                float(row["stgc_overhead"]) if row["stgc_overhead"] else None))
    return results


def plot(results: list[Result], path: str, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e .[plot]); no plot written",
              file=sys.stderr)
        return False
    groups = list(dict.fromkeys(r.point.group for r in results))
    variants = ["off", *[v for v in STGC_VARIANTS if any(r.point.stgc == v for r in results)]]
    by_key = {(r.point.group, r.point.stgc): r for r in results}
    width = 0.8 / len(variants)
    colors = dict(zip(["off", *STGC_VARIANTS], plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, 1.6 * len(groups)), 8.5), sharex=True)
    for i, variant in enumerate(variants):
        xs, tput, over = [], [], []
        for g, group in enumerate(groups):
            r = by_key.get((group, variant))
            if r is None:
                continue
            xs.append(g + (i - (len(variants) - 1) / 2) * width)
            tput.append(r.tokens_per_second)
            over.append(100 * r.overhead if r.overhead is not None else 0.0)
        label = "STGC off" if variant == "off" else f"STGC {variant}"
        top.bar(xs, tput, width, label=label, color=colors[variant])
        if variant != "off":
            bottom.bar(xs, over, width, label=label, color=colors[variant])
    top.set_ylabel("tokens / s (median step)")
    top.set_ylim(0, 1.3 * max(r.tokens_per_second for r in results))
    top.legend(fontsize=8, ncol=3, loc="upper left")
    fig.suptitle(title, fontsize=10)
    bottom.set_ylabel("STGC overhead (% throughput lost)")
    bottom.axhline(0, color="black", linewidth=0.5)
    bottom.set_xticks(range(len(groups)))
    bottom.set_xticklabels(groups, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the fixed 13-job grid")
    parser.add_argument("--world-sizes", default="1,2", help="comma list (full grid)")
    parser.add_argument("--experts", default="4,8", help="comma list (full grid)")
    parser.add_argument("--topk", default="2,3", help="comma list (full grid; >= 2)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4, help="steps left out of the median")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run each point N times (interleaved) and keep the fastest")
    parser.add_argument("--out-dir", default="runs/scaling")
    parser.add_argument("--name", default="scaling", help="file stem of the CSV and PNG")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per job")
    parser.add_argument("--label", default=None, help="plot title (default: CPU numbers + host)")
    parser.add_argument("--limit", type=int, default=None, help="run only the first N points")
    parser.add_argument("--replot", default=None, metavar="CSV",
                        help="only redraw the PNG next to an existing CSV (title: --label)")
    args, extra = parser.parse_known_args(argv)  # the rest goes to `megatron_stgc train`

    if args.replot:
        results = read_csv(args.replot)
        png_path = os.path.splitext(args.replot)[0] + ".png"
        plot(results, png_path, args.label or "CPU numbers")
        print(f"wrote {png_path}")
        return 0
    if args.quick:
        points = quick_grid()
    else:
        ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
        points = full_grid(ints(args.world_sizes), ints(args.experts), ints(args.topk))
    points = points[:args.limit] if args.limit else points
    os.makedirs(args.out_dir, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as work_dir:
        cache = os.path.join(work_dir, "cache")  # the tokenizer is trained once per study
        best: dict[Point, Result] = {}
        for repeat in range(args.repeats):
            for n, point in enumerate(points, 1):
                result = run_point(point, args.steps, args.warmup, work_dir, cache, extra,
                                   args.timeout)
                if point not in best or result.tokens_per_second > best[point].tokens_per_second:
                    best[point] = result
                print(f"[{repeat + 1}.{n}/{len(points)}] "
                      f"{point.group.replace(chr(10), ' ')} STGC {point.stgc}: "
                      f"{result.tokens_per_second:.0f} tokens/s ({result.wall_s:.1f}s)", flush=True)
        results = [best[point] for point in points]
    add_overheads(results)
    csv_path = os.path.join(args.out_dir, f"{args.name}.csv")
    write_csv(results, csv_path)
    device = "CPU" if not _cuda() else "GPU"
    title = args.label or (f"{device} numbers ({platform.machine()}, {os.cpu_count()} cores, "
                           f"{'gloo' if device == 'CPU' else 'NCCL'}) - not GPU performance\n"
                           "tiny MoE GPT (examples/tiny_moe_cpu.yaml), fixed global batch, "
                           f"median of steps {args.warmup + 1}-{args.steps}, best of "
                           f"{args.repeats} runs")
    png_path = os.path.join(args.out_dir, f"{args.name}.png")
    wrote = plot(results, png_path, title)
    print(f"wrote {csv_path}" + (f" and {png_path}" if wrote else ""))
    return 0


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
