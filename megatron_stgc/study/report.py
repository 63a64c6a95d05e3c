"""The study's outputs: runs.csv, summary.csv, summary.txt, study.png (bars of chosen columns,
mean +- std per point; the compared column's paired difference / ratio with its 95% interval)
and plots/ (``megatron-stgc plot`` of the first seed's run of every point)."""

from __future__ import annotations

import csv
import fnmatch
import math
import os
from typing import Any, Optional

from megatron_stgc.study.collect import axis_names, collect_rows
from megatron_stgc.study.plan import Study, run_dir
from megatron_stgc.study.stats import compared, metric_columns, summarise


def write_csv(path: str, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(path + ".tmp", path)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _suffix(kind: str) -> str:
    return "diff" if kind == "difference" else "ratio"


def summary_text(summary: list[dict], columns: list[str], kinds: dict[str, str]) -> str:
    """A fixed-width table: per point the seeds, and for each column mean +- std and, when
    compared, the paired difference / ratio [95% interval]."""
    header = ["point", "seeds"]
    for column in columns:
        header.append(f"{column} (mean +- std)")
        if column in kinds:
            header.append(f"{_suffix(kinds[column])} vs baseline [95% CI]")
    table = [header]
    for line in summary:
        cells = [line["point"], str(line["seeds"])]
        for column in columns:
            cells.append(f"{_fmt(line.get(f'{column}_mean'))} +- "
                         f"{_fmt(line.get(f'{column}_std'))}")
            if column in kinds:
                key = f"{column}_{_suffix(kinds[column])}"
                cells.append("" if line.get(key) is None else
                             f"{_fmt(line[key])} [{_fmt(line.get(key + '_low'))}, "
                             f"{_fmt(line.get(key + '_high'))}]")
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in table)


def _expand(patterns: Optional[list[str]], columns: list[str], fallback: list[str]) -> list[str]:
    if not patterns:
        return fallback
    return list(dict.fromkeys(c for p in patterns for c in columns if fnmatch.fnmatchcase(c, p)))


def write_png(path: str, summary: list[dict], bars: list[str], compare: Optional[str],
              kind: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [line["point"] for line in summary]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(9, 1.8 * len(points)), 9))
    width = 0.8 / max(len(bars), 1)
    for index, column in enumerate(bars):
        means = [line.get(f"{column}_mean") or 0.0 for line in summary]
        stds = [line.get(f"{column}_std") or 0.0 for line in summary]
        xs = [p + (index - (len(bars) - 1) / 2) * width for p in range(len(points))]
        top.bar(xs, means, width=width, yerr=stds, capsize=2, label=column)
    top.set(title="Mean +- std over seeds")
    top.set_xticks(range(len(points)), points, rotation=20, ha="right", fontsize=8)
    top.grid(alpha=0.3, axis="y")
    top.legend(fontsize=8, ncol=3)
    key = f"{compare}_{_suffix(kind)}"
    shown = [line for line in summary if line.get(key) is not None]
    for x, line in enumerate(shown):
        mean, low, high = line[key], line[key + "_low"], line[key + "_high"]
        errors = [[0.0], [0.0]] if math.isnan(low) else [[mean - low], [high - mean]]
        bottom.errorbar([x], [mean], yerr=errors, fmt="o", capsize=4, color="C0")
    bottom.axhline(0.0 if kind == "difference" else 1.0, color="black", linewidth=0.8)
    bottom.set_xticks(range(len(shown)), [line["point"] for line in shown], rotation=20,
                      ha="right", fontsize=8)
    bottom.set(title=f"{compare}: {'minus' if kind == 'difference' else 'divided by'} the "
               "baseline's, paired by seed (mean, 95% t-interval)", ylabel=_suffix(kind))
    bottom.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def analysis_plots(study: Study, say=print) -> list[str]:
    """``megatron-stgc plot`` over the first seed's run of every point (labels: point/seed)."""
    from megatron_stgc.analysis.plots import write_plots

    seed = study.seeds[0]
    dirs = [run_dir(study.output, point, seed) for point in study.points]
    dirs = [d for d in dirs if os.path.isfile(os.path.join(d, study.report["log_file"]))]
    if not dirs:
        return []
    return write_plots(dirs, os.path.join(study.output, "plots"), say=say,
                       log_name=study.report["log_file"])


def write_report(study: Study, ran_now: set[str], say=print) -> str:
    """Collect the finished runs and write every output; returns the summary text."""
    rows = collect_rows(study, ran_now, say)
    if not rows:
        say("study: no run has finished yet; nothing to summarise")
        return ""
    write_csv(os.path.join(study.output, "runs.csv"), rows)
    report = study.report
    kinds = compared(metric_columns(rows), report["compare"] or {})
    axes = {name: {axis: point.axes.get(axis, "") for axis in axis_names(study)}
            for name, point in study.points.items()}
    summary = summarise(rows, list(study.points), axes, study.baseline_of,
                        report["compare"] or {})
    write_csv(os.path.join(study.output, "summary.csv"), summary)
    columns = _expand(report["summary_columns"], metric_columns(rows), list(kinds))
    text = summary_text(summary, columns, kinds)
    text += (f"\n\n{len(rows)} of {len(study.runs)} runs finished ({len(ran_now)} ran in this "
             f"call); last {report['metrics']['last_steps']} steps of each log, "
             f"{report['metrics']['reduce']}\n")
    with open(os.path.join(study.output, "summary.txt"), "w") as f:
        f.write(text)
    _figures(study, summary, rows, kinds, say)
    return text


def _figures(study: Study, summary: list[dict], rows: list[dict], kinds: dict[str, str],
             say) -> None:
    plot = study.report["plot"]
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        say(f"study: no figures ({error}; pip install -e .[plot])")
        return
    bars = _expand(plot["bars"], metric_columns(rows), list(kinds))
    compare = plot["compare"] or next(iter(kinds), None)
    if bars or compare:
        write_png(os.path.join(study.output, "study.png"), summary, bars, compare,
                  kinds.get(compare, "difference"))
    if plot["analysis"]:
        analysis_plots(study, say=say)
