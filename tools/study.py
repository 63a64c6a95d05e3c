#!/usr/bin/env python
"""Does STGC help? Seed-paired ablations on the digits MoE-LLaVA (MoE-LLaVA's recipe).

One stage II (dense) run and its export, shared by every point; then, for every seed and every
point of the grid, a stage III run (upcycled, MoE layers only) and its eval, through the same
torchrun launch as the main job (tools/digits_main_job.py). The baseline is ``--stgc
--stgc-beta 0`` (conflicts measured, gradients exactly plain MoE's).

    python tools/study.py --output runs/study --seeds 1,2,3,4,5 \\
        --betas 0.1,0.3,1.0 --taus 0,-0.1 --layers all,2

Grid axes (comma lists; every combination is a point): --betas, --taus, --layers
(``--stgc-layers`` values; ``all`` = every MoE layer), --estimators, --normalizations; and
single points beside the grid with --extra-points 'tau=-0.1;layers=2' (one-factor changes
from the grid's first values). --with-ltdr adds LTDR (baseline + --ltdr) and STGC + LTDR (the
grid's first point + --ltdr), with LTDR's tail fraction and experts per image token in the CSVs.
Writes OUTPUT/runs.csv (one row per run: accuracy per question type, and over the last 20
steps the loss, conflict fraction, routing score of conflicting pairs, gradient consistency
and the expert-load imbalance of image and text tokens: std/mean of tokens per expert),
OUTPUT/summary.csv (per point: mean and standard deviation over seeds of each of these, and
for accuracies the seed-paired difference to the baseline with a 95% t-interval), OUTPUT/study.png and OUTPUT/summary.txt. Progress (runs done, time left) on
the console. A second call resumes: finished runs (their results.json exists) are not rerun,
an interrupted one resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tools")]

import digits_main_job as job  # noqa: E402
from megatron_stgc.analysis.logs import last_steps, step_mean  # noqa: E402
from megatron_stgc.analysis.plots import expert_token_totals  # noqa: E402

BASELINE = "baseline"
CATEGORIES = ("digit", "even", "greater_than_four", "plus_one", "text", "overall")


AXES = ("beta", "tau", "layers", "estimator", "normalization")
LTDR_KEYS = ("ltdr_tail_fraction", "ltdr_experts_per_vision_token")  # ltdr/* metrics


def _point(beta, tau, layers, estimator, normalization) -> tuple[str, list[str]]:
    name = f"beta{beta}_tau{tau}_layers{layers.replace(',', '+')}"
    if estimator != "exact":
        name += f"_{estimator}"
    if normalization != "pairs":
        name += f"_norm{normalization}"
    return name, ["--stgc", "--stgc-beta", beta, "--stgc-tau", tau, "--stgc-layers", layers,
                  "--stgc-estimator", estimator, "--stgc-normalization", normalization]


def grid_points(args) -> dict[str, list[str]]:
    """{point name: stage III flags}: the baseline, every combination of the axes, then the
    --extra-points (each axis not named there takes the first value of its list)."""
    points = {BASELINE: ["--stgc", "--stgc-beta", "0"]}
    lists = [args.betas.split(","), args.taus.split(","), args.layers.split(","),
             args.estimators.split(","), args.normalizations.split(",")]
    for values in itertools.product(*lists):
        name, flags = _point(*values)
        points[name] = flags
    for spec in filter(None, (args.extra_points or "").split(";")):
        values = dict(zip(AXES, (axis[0] for axis in lists)))
        for item in spec.split(","):
            key, _, value = item.partition("=")
            if key.strip() not in values:
                raise SystemExit(f"--extra-points: unknown axis {key!r} in {spec!r}; "
                                 f"axes: {', '.join(AXES)}")
            values[key.strip()] = value.strip()
        name, flags = _point(*(values[axis] for axis in AXES))
        points[name] = flags
    if getattr(args, "with_ltdr", False):
        grid_first = list(points)[1]  # the grid's first STGC point
        points["ltdr"] = points[BASELINE] + ["--ltdr"]
        points[f"{grid_first}_ltdr"] = points[grid_first] + ["--ltdr"]
    return points


def _last_mean(records: list[dict], key: str):
    return step_mean(last_steps(records, job.LAST_STEPS), key)


def _load_cv(records: list[dict], modality: str):
    """Expert imbalance of one modality's tokens over the last steps: the coefficient of
    variation (std / mean) of tokens per expert, averaged over the MoE layers; 0 = even."""
    totals = expert_token_totals(last_steps(records, job.LAST_STEPS))
    cvs = [statistics.pstdev(row) / statistics.fmean(row)
           for (_, row_modality), row in totals.items()
           if row_modality == modality and sum(row) > 0]
    return statistics.fmean(cvs) if cvs else None


def run_point(args, stage2: dict, point: str, flags: list[str], seed: int) -> dict:
    """Train + eval one (point, seed) unless its results exist; its row for runs.csv."""
    run_dir = os.path.join(args.output, "runs", point, f"seed{seed}")
    results_path = os.path.join(run_dir, "results.json")
    run_flags = job.stage3_flags(stage2["common"], stage2["pretrained"], args.stage3_iters,
                                 run_dir, flags + ["--seed", str(seed)] + args.extra)
    seconds = None
    if not os.path.isfile(results_path):
        seconds = job.torchrun(args.nproc, ["train"] + run_flags,
                               os.path.join(run_dir, "train.out"))
        job.evaluate(args.nproc, f"{point}-seed{seed}", run_dir, run_flags, stage2["data_dir"],
                     args.eval_limit)
        with open(os.path.join(run_dir, "train_seconds"), "w") as f:
            f.write(f"{seconds:.1f}\n")
    with open(results_path) as f:
        results = json.load(f)
    records = job.read_log(os.path.join(run_dir, "train_log.jsonl"))
    row = {"point": point, "seed": seed}
    for category in CATEGORIES:
        entry = results["overall"] if category == "overall" else results["per_category"].get(
            category)
        row[f"acc_{category}"] = None if entry is None else 100.0 * entry["accuracy"]
    row["final_loss"] = _last_mean(records, "loss")
    for key in ("conflict_fraction", "conflict_routing_score", "gradient_consistency"):
        row[key] = _last_mean(records, f"stgc/{key}")
    for key in LTDR_KEYS:  # None for runs without --ltdr
        row[key] = _last_mean(records, key.replace("ltdr_", "ltdr/", 1))
    row["image_load_cv"] = _load_cv(records, "image")
    row["text_load_cv"] = _load_cv(records, "text")
    with open(os.path.join(run_dir, "train_seconds")) as f:
        row["train_seconds"] = float(f.read())
    row["ran_now"] = seconds is not None
    return row


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) of a 95% Student-t interval; (mean, nan, nan) for one value."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    from scipy.stats import t

    half = t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def summarise(rows: list[dict], points: list[str]) -> list[dict]:
    """Per point: mean/std over seeds; seed-paired difference to the baseline (95% CI)."""
    by_point = {p: {r["seed"]: r for r in rows if r["point"] == p} for p in points}
    base = by_point[BASELINE]
    summary = []
    for point in points:
        runs = by_point[point]
        line = {"point": point, "seeds": len(runs)}
        for key in [f"acc_{c}" for c in CATEGORIES] + [
                "final_loss", "conflict_fraction", "conflict_routing_score",
                "gradient_consistency", "image_load_cv", "text_load_cv", *LTDR_KEYS]:
            values = [r[key] for r in runs.values() if r[key] is not None]
            line[f"{key}_mean"] = statistics.fmean(values) if values else None
            line[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
            if key.startswith("acc_") and point != BASELINE:
                paired = [runs[s][key] - base[s][key] for s in runs
                          if s in base and runs[s][key] is not None]
                if paired:
                    mean, low, high = t_interval(paired)
                    line[f"{key}_diff"], line[f"{key}_diff_low"], line[f"{key}_diff_high"] = \
                        mean, low, high
        summary.append(line)
    return summary


def write_csv(path: str, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def summary_text(summary: list[dict]) -> str:
    def fmt(value, digits=1):
        return "   n/a" if value is None or (isinstance(value, float) and math.isnan(value)) \
            else f"{value:6.{digits}f}"

    lines = [f"{'point':36s} seeds  overall acc (mean +- std)   paired diff to baseline "
             "[95% CI]   conflict fraction  image-load CV"]
    for line in summary:
        diff = ""
        if "acc_overall_diff" in line:
            diff = (f"{fmt(line['acc_overall_diff'])} [{fmt(line['acc_overall_diff_low'])}, "
                    f"{fmt(line['acc_overall_diff_high'])}]")
        lines.append(f"{line['point']:36s} {line['seeds']:5d}  {fmt(line['acc_overall_mean'])} +- "
                     f"{fmt(line['acc_overall_std'])}          {diff:30s} "
                     f"{fmt(line['conflict_fraction_mean'], 3)}      "
                     f"{fmt(line['image_load_cv_mean'], 3)}")
    return "\n".join(lines)


def write_png(path: str, summary: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [line["point"] for line in summary]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(9, 1.1 * len(points) * 1.6), 9))
    width = 0.8 / len(CATEGORIES)
    for index, category in enumerate(CATEGORIES):
        means = [line[f"acc_{category}_mean"] or 0.0 for line in summary]
        stds = [line[f"acc_{category}_std"] or 0.0 for line in summary]
        xs = [p + (index - (len(CATEGORIES) - 1) / 2) * width for p in range(len(points))]
        top.bar(xs, means, width=width, yerr=stds, capsize=2, label=category)
    top.set(title="Accuracy per question type (mean +- std over seeds)", ylabel="accuracy (%)")
    top.set_xticks(range(len(points)), points, rotation=20, ha="right", fontsize=8)
    top.grid(alpha=0.3, axis="y")
    top.legend(fontsize=8, ncol=3)
    compared = [line for line in summary if "acc_overall_diff" in line]
    if compared:
        xs = range(len(compared))
        means = [line["acc_overall_diff"] for line in compared]
        errors = [[m - (line["acc_overall_diff_low"] if not math.isnan(
                   line["acc_overall_diff_low"]) else m) for m, line in zip(means, compared)],
                  [(line["acc_overall_diff_high"] if not math.isnan(
                   line["acc_overall_diff_high"]) else m) - m for m, line in zip(means, compared)]]
        bottom.errorbar(xs, means, yerr=errors, fmt="o", capsize=4)
        bottom.axhline(0.0, color="black", linewidth=0.8)
        bottom.set_xticks(list(xs), [line["point"] for line in compared], rotation=20,
                          ha="right", fontsize=8)
    bottom.set(title="Overall accuracy minus the baseline's, paired by seed (mean, 95% t-interval)",
               ylabel="difference (accuracy points)")
    bottom.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/study")
    parser.add_argument("--config", default=os.path.join(REPO, "examples",
                                                         "tiny_llava_digits.yaml"))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--seeds", default="1,2,3,4,5", help="stage III training seeds")
    parser.add_argument("--stage2-seed", type=int, default=1234)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--betas", default="1.0")
    parser.add_argument("--taus", default="0")
    parser.add_argument("--layers", default="all", help="--stgc-layers values, ';'-free")
    parser.add_argument("--estimators", default="exact")
    parser.add_argument("--normalizations", default="pairs")
    parser.add_argument("--extra-points", default=None,
                        help="points beside the grid, ';'-separated, e.g. "
                             "'tau=-0.1;layers=2' (other axes: the first value of their list)")
    parser.add_argument("--with-ltdr", action="store_true",
                        help="also the points 'ltdr' (baseline + --ltdr) and '<first grid "
                             "point>_ltdr' (STGC + LTDR); docs/LTDR.md")
    parser.add_argument("--dense-iters", type=int, default=400)
    parser.add_argument("--stage3-iters", type=int, default=300)
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="evaluate on the first N validation questions only (tests)")
    args, extra = parser.parse_known_args(argv)
    args.extra = [a for a in extra if a != "--"]
    args.output = os.path.abspath(args.output)
    seeds = [int(s) for s in args.seeds.split(",")]
    points = grid_points(args)
    start = time.perf_counter()

    stage2_done = os.path.isfile(os.path.join(args.output, "dense", "pretrained", "model.pt"))
    stage2 = job.prepare_stage2(args.output, args.config, args.nproc, args.stage2_seed,
                                args.data_seed, args.dense_iters, args.extra, reuse_export=True)
    print(f"study: stage II {'reused' if stage2_done else 'trained'}; {len(points)} points x "
          f"{len(seeds)} seeds = {len(points) * len(seeds)} runs", flush=True)
    rows, fresh_seconds, total = [], [], len(points) * len(seeds)
    for seed in seeds:
        for point, flags in points.items():
            began = time.perf_counter()
            row = run_point(args, stage2, point, flags, seed)
            rows.append(row)
            if row["ran_now"]:
                fresh_seconds.append(time.perf_counter() - began)
            left = total - len(rows)
            eta = statistics.fmean(fresh_seconds) * left if fresh_seconds else 0.0
            print(f"study: [{len(rows)}/{total}] {point} seed {seed}: overall "
                  f"{row['acc_overall']:.1f}% ({'ran' if row['ran_now'] else 'done before'}); "
                  f"about {eta / 60:.0f} min left", flush=True)
            write_csv(os.path.join(args.output, "runs.csv"), rows)
    summary = summarise(rows, list(points))
    write_csv(os.path.join(args.output, "summary.csv"), summary)
    text = summary_text(summary)
    text += (f"\n\n{total} runs ({len(fresh_seconds)} run now), stage III {args.stage3_iters} steps "
             f"each from one stage II of {args.dense_iters} steps; wall time of this call "
             f"{(time.perf_counter() - start) / 60:.1f} min\n")
    with open(os.path.join(args.output, "summary.txt"), "w") as f:
        f.write(text)
    try:
        write_png(os.path.join(args.output, "study.png"), summary)
    except ImportError as error:
        print(f"study: no PNG ({error}; pip install -e .[plot])", flush=True)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
