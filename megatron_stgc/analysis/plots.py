"""``megatron-stgc plot RUN_DIR...``: PNG figures from training logs, several runs overlaid.

Reads each run's JSONL log (``RUN_DIR/train_log.jsonl``, or the file itself) and writes:

  loss.png                    training loss per step
  conflict_fraction.png       conflicting / judged (token, expert) pairs per step
  conflict_routing_score.png  mean routing score of the conflicting pairs on their experts
                              (the paper's Fig. 3a statistic) per step
  gradient_consistency.png    mean pairwise cosine of an expert's token gradients, one panel
                              per MoE layer (Fig. 3b/3c), on the steps that computed it
  expert_load_final.png       tokens per expert per modality per MoE layer over the last
                              steps, in % (Fig. 4)
  expert_load_over_time.png   each expert's share of image tokens per MoE layer over steps
  routing_stability.png       load-share churn, probe top-k changes and routing entropy per
                              MoE layer over steps (analysis/routing_figure.py)

Runs are labelled by their path relative to the runs' common parent (``beta1/seed1`` and
``baseline/seed1``, not ``seed1`` twice); one run by its directory's name.
A run without ``stgc/*`` metrics (trained without --stgc) is named in a message and left out
of the STGC figures; a figure no run has data for is not written (also named).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Callable, Optional

from megatron_stgc.analysis.logs import last_steps
from megatron_stgc.analysis.routing_figure import routing_figure

LAST_STEPS = 20


def _log_path(path: str, log_name: str = "train_log.jsonl") -> str:
    return os.path.join(path, log_name) if os.path.isdir(path) else path


def read_records(path: str, log_name: str = "train_log.jsonl") -> list[dict]:
    """The step records of a run directory (its ``log_name``) or of a JSONL log file."""
    log = _log_path(path, log_name)
    if not os.path.isfile(log):
        raise FileNotFoundError(f"{path}: no {log_name} (pass the run directory or its "
                                "--log-file)")
    records = []
    with open(log) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                if "iteration" in record and "loss" in record:
                    records.append(record)
    if not records:
        raise ValueError(f"{log}: no step records")
    return records


def run_labels(paths: list[str], log_name: str = "train_log.jsonl") -> list[str]:
    """A unique label per run: its path relative to the runs' common parent, so that
    ``a/seed1`` and ``b/seed1`` stay apart (one run: its directory's name). A log file
    named ``log_name`` stands for its directory, another file for its path without .jsonl."""
    sources = []
    for path in paths:
        path = os.path.abspath(path)
        if not os.path.isdir(path):
            path = (os.path.dirname(path) if os.path.basename(path) == log_name
                    else os.path.splitext(path)[0])
        sources.append(path)
    if len(set(sources)) == 1:
        labels = [os.path.basename(sources[0]) or sources[0]] * len(sources)
    else:
        parent = os.path.commonpath(sources)
        labels = [os.path.relpath(source, parent) for source in sources]
        labels = [os.path.basename(s) if label == "." else label
                  for s, label in zip(sources, labels)]
    seen: dict[str, int] = {}
    unique = []
    for label in labels:  # the same run given twice
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return unique


def read_run(path: str, log_name: str = "train_log.jsonl") -> tuple[str, list[dict]]:
    """(run name, step records) of one run directory or JSONL log file."""
    return run_labels([path], log_name)[0], read_records(path, log_name)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["iteration"], r[key]) for r in records if key in r and r[key] is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _line_figure(runs, key: str, title: str, ylabel: str, path: str) -> bool:
    plotted = [(name, *_series(records, key)) for name, records in runs]
    plotted = [p for p in plotted if p[1]]
    if not plotted:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, steps, values in plotted:
        ax.plot(steps, values, label=name, linewidth=1.2)
    ax.set(title=title, xlabel="training step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _moe_layers(runs) -> list[str]:
    layers = set()
    for _, records in runs:
        for record in records:
            layers.update(record.get("tokens_per_expert", {}))
    return sorted(layers, key=lambda name: int(name.split("_")[-1]))


def _consistency_figure(runs, path: str) -> bool:
    keys = sorted({key for _, records in runs for r in records for key in r
                   if key.startswith("stgc/layer") and key.endswith("/gradient_consistency")},
                  key=lambda k: int(k.split("/")[1][len("layer"):]))
    if not keys:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, records in runs:
            steps, values = _series(records, key)
            if steps:
                ax.plot(steps, values, marker="o", markersize=3, label=name)
        layer = key.split("/")[1][len("layer"):]
        ax.set(title=f"MoE layer {layer} (megatron numbering)", xlabel="training step",
               ylabel="mean pairwise cosine of token gradients")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Gradient consistency per MoE layer (paper Fig. 3b/3c)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def expert_token_totals(records: list[dict]) -> dict[tuple[str, str], list[int]]:
    """{(MoE layer, modality): tokens per expert} summed over these step records."""
    totals: dict[tuple[str, str], list[int]] = {}
    for record in records:
        for layer, by_modality in (record.get("tokens_per_expert_by_modality") or {}).items():
            for modality, counts in by_modality.items():
                row = totals.get((layer, modality), [0] * len(counts))
                totals[(layer, modality)] = [a + b for a, b in zip(row, counts)]
    return totals


def _final_shares(records: list[dict], layer: str, modality: str) -> Optional[list[float]]:
    counts = expert_token_totals(last_steps(records, LAST_STEPS)).get((layer, modality))
    if not counts or sum(counts) == 0:
        return None
    return [100.0 * c / sum(counts) for c in counts]


def _load_final_figure(runs, path: str) -> bool:
    layers = _moe_layers(runs)
    modalities = ("text", "image")
    if not any(_final_shares(r, layer, m) for _, r in runs for layer in layers for m in modalities):
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(len(modalities), len(layers), figsize=(4.5 * len(layers), 6.5),
                             squeeze=False)
    width = 0.8 / max(len(runs), 1)
    for row, modality in enumerate(modalities):
        for col, layer in enumerate(layers):
            ax = axes[row][col]
            for index, (name, records) in enumerate(runs):
                shares = _final_shares(records, layer, modality)
                if shares:
                    xs = [e + (index - (len(runs) - 1) / 2) * width for e in range(len(shares))]
                    ax.bar(xs, shares, width=width, label=name)
                    ax.set_xticks(range(len(shares)))
            ax.set(title=f"{layer}, {modality} tokens", xlabel="expert",
                   ylabel=f"% of routed pairs (last {LAST_STEPS} steps)")
            ax.grid(alpha=0.3, axis="y")
            ax.legend(fontsize=8)
    fig.suptitle("Tokens per expert per modality (paper Fig. 4)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _load_over_time_figure(runs, path: str, modality: str = "image") -> bool:
    layers = _moe_layers(runs)
    series = {}
    for name, records in runs:
        for layer in layers:
            steps, shares = [], []
            for record in records:
                row = record.get("tokens_per_expert_by_modality", {}).get(layer, {}).get(modality)
                if row and sum(row):
                    steps.append(record["iteration"])
                    shares.append([100.0 * c / sum(row) for c in row])
            if steps:
                series[(name, layer)] = (steps, shares)
    if not series:
        return False
    runs = [(name, records) for name, records in runs
            if any((name, layer) in series for layer in layers)]
    plt = _pyplot()
    fig, axes = plt.subplots(len(runs), len(layers), figsize=(4.5 * len(layers), 3.2 * len(runs)),
                             squeeze=False)
    for row, (name, _) in enumerate(runs):
        for col, layer in enumerate(layers):
            ax = axes[row][col]
            steps, shares = series.get((name, layer), ([], []))
            for expert in range(len(shares[0]) if shares else 0):
                ax.plot(steps, [s[expert] for s in shares], label=f"expert {expert}", linewidth=1)
            ax.set(title=f"{name}: {layer}", xlabel="training step",
                   ylabel=f"% of {modality} tokens")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"Share of {modality} tokens per expert over training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


FIGURES: dict[str, tuple[bool, Callable]] = {
    # name: (needs STGC metrics, writer(runs, path) -> wrote?)
    "loss.png": (False, lambda runs, p: _line_figure(runs, "loss", "Training loss",
                                                     "LM loss (nats / answer token)", p)),
    "conflict_fraction.png": (True, lambda runs, p: _line_figure(
        runs, "stgc/conflict_fraction", "Conflicting (token, expert) pairs",
        "conflicting / judged pairs", p)),
    "conflict_routing_score.png": (True, lambda runs, p: _line_figure(
        runs, "stgc/conflict_routing_score",
        "Routing score of conflicting pairs on their experts (paper Fig. 3a)",
        "mean softmax router probability", p)),
    "gradient_consistency.png": (True, _consistency_figure),
    "expert_load_final.png": (False, _load_final_figure),
    "expert_load_over_time.png": (False, _load_over_time_figure),
    "routing_stability.png": (False, lambda runs, p: routing_figure(runs, p, _pyplot)),
}


def write_plots(paths: list[str], out_dir: str, say=print,
                log_name: str = "train_log.jsonl") -> list[str]:
    """Write every figure the runs have data for into ``out_dir``; returns the files. Runs
    are labelled by run_labels (unique even when their directories share a name)."""
    runs = list(zip(run_labels(paths, log_name),
                    [read_records(path, log_name) for path in paths]))
    with_stgc = [(name, records) for name, records in runs
                 if any(key.startswith("stgc/") for r in records for key in r)]
    for name, _ in runs:
        if all(name != n for n, _ in with_stgc):
            say(f"plot: {name}: no stgc/* metrics in its log (trained without --stgc): "
                "left out of the STGC figures")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for filename, (needs_stgc, writer) in FIGURES.items():
        chosen = with_stgc if needs_stgc else runs
        path = os.path.join(out_dir, filename)
        if chosen and writer(chosen, path):
            written.append(path)
        else:
            say(f"plot: {filename}: no run has the data for it; not written")
    return written


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-stgc plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (or their JSONL logs)")
    parser.add_argument("--out", default=None, help="where the PNGs go (default: "
                        "<first run>/plots)")
    args = parser.parse_args(argv)
    first = args.runs[0] if os.path.isdir(args.runs[0]) else os.path.dirname(args.runs[0])
    out_dir = args.out or os.path.join(first, "plots")
    try:
        written = write_plots(args.runs, out_dir)
    except (FileNotFoundError, ValueError) as error:
        print(f"megatron-stgc plot: {error}")
        return 2
    for path in written:
        print(f"plot: wrote {path}")
    return 0
