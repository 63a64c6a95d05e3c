"""megatron-stgc study's aggregation on hand-made run directories: runs.csv takes whatever the
logs hold (unknown keys become columns, missing ones blanks), summary.csv's seed-paired
differences / ratios and 95% t-intervals equal values computed here by hand, a resumed log
counts each step once, and unfinished runs are left out and named."""

from __future__ import annotations

import csv
import json
import math
import os

import pytest

from megatron_stgc.study.cli import main as study_main
from megatron_stgc.study.stats import t_quantile

# Student-t 97.5% quantiles from a printed table (e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2)
T_TABLE = {1: 12.706, 2: 4.303, 4: 2.776, 9: 2.262, 29: 2.045}

GRID = """
seeds: [1, 2, 3]
grid:
  axes:
    stgc: {choices: {"off": [], "on": [--stgc]}, values: ["off", "on"]}
points:
  named: [--whatever]
baseline: {stgc: "off"}
stages:
  train: {scope: run, command: ["true"]}
  eval: {scope: run, command: ["true"]}
compare:
  acc_*: difference
  tokens_per_second: ratio
metrics: {last_steps: 2}
"""


def _write_run(out, point, seed, overall, per_category, records, stages=("train", "eval")):
    run = out / "runs" / point / f"seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    if overall is not None:
        (run / "results.json").write_text(json.dumps({
            "overall": {"accuracy": overall},
            "per_category": {k: {"accuracy": v} for k, v in per_category.items()},
            "num_questions": 10}))
    with open(run / "train_log.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    for stage in stages:
        (run / f"{stage}.done").write_text("12.5\n")


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _log(tps: list[float], extra=None):
    return [{"iteration": i + 1, "loss": 1.0 + i, "tokens_per_second": t,
             "update_successful": True, **(extra or {})} for i, t in enumerate(tps)]


@pytest.fixture
def study(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID)
    out = tmp_path / "out"
    base_acc = [0.60, 0.62, 0.58]
    on_acc = [0.63, 0.66, 0.60]
    base_tps = [100.0, 200.0, 400.0]
    on_tps = [90.0, 170.0, 380.0]
    for seed in (1, 2, 3):
        _write_run(out, "stgcoff", seed, base_acc[seed - 1], {"digit": 0.5},
                   _log([1.0, base_tps[seed - 1], base_tps[seed - 1]]))
        _write_run(out, "stgcon", seed, on_acc[seed - 1], {"digit": 0.4 + 0.1 * seed},
                   _log([1.0, on_tps[seed - 1], on_tps[seed - 1]],
                        {"stgc/new_metric": float(seed)} if seed != 2 else None))
    _write_run(out, "named", 1, 0.5, {}, _log([1.0, 2.0, 3.0]))  # seeds 2, 3 unfinished
    _write_run(out, "named", 2, None, {}, [], stages=("train",))
    # plan the study without running anything (the SLURM launcher only writes scripts and
    # study.json), then aggregate as the collect job does
    assert study_main(["--grid", str(grid), "--output", str(out), "--launcher", "slurm"]) == 0
    assert study_main(["--collect", "--output", str(out)]) == 0
    return out


def test_paired_differences_and_intervals_match_a_hand_computation(study):
    summary = {row["point"]: row for row in _rows(study / "summary.csv")}
    on = summary["stgcon"]
    diffs = [3.0, 4.0, 2.0]  # accuracy points, seed by seed
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    half = T_TABLE[2] * sd / math.sqrt(3)
    assert float(on["acc_overall_diff"]) == pytest.approx(mean)
    assert float(on["acc_overall_diff_low"]) == pytest.approx(mean - half, abs=2e-3)
    assert float(on["acc_overall_diff_high"]) == pytest.approx(mean + half, abs=2e-3)
    assert on["acc_overall_diff_pairs"] == "3" and on["baseline"] == "stgcoff"
    # per category: 0.5, 0.6, 0.7 against 0.5 -> 0, 10, 20 points
    assert float(on["acc_digit_diff"]) == pytest.approx(10.0)
    ratios = [90 / 100, 170 / 200, 380 / 400]
    r_mean = sum(ratios) / 3
    r_sd = math.sqrt(sum((r - r_mean) ** 2 for r in ratios) / 2)
    assert float(on["tokens_per_second_ratio"]) == pytest.approx(r_mean)
    assert float(on["tokens_per_second_ratio_high"]) == pytest.approx(
        r_mean + T_TABLE[2] * r_sd / math.sqrt(3), abs=1e-4)
    assert float(on["acc_overall_mean"]) == pytest.approx(63.0)
    assert float(on["acc_overall_std"]) == pytest.approx(math.sqrt(((63 - 63) ** 2 + 9 + 9) / 2))
    # the baseline and the named point (no baseline of its own) get no differences
    assert summary["stgcoff"]["acc_overall_diff"] == ""
    assert summary["named"]["acc_overall_diff"] == "" and summary["named"]["seeds"] == "1"


def test_runs_csv_takes_unknown_keys_and_leaves_missing_ones_blank(study):
    rows = {(r["point"], r["seed"]): r for r in _rows(study / "runs.csv")}
    assert ("named", "2") not in rows and ("named", "3") not in rows  # unfinished
    assert len(rows) == 7
    assert rows[("stgcon", "1")]["new_metric"] == "1.0"
    assert rows[("stgcon", "2")]["new_metric"] == ""
    assert rows[("stgcoff", "1")]["new_metric"] == ""
    assert rows[("stgcon", "1")]["stgc"] == "on" and rows[("named", "1")]["stgc"] == ""
    # last 2 steps of [1.0, 90, 90]: the warm-up step is outside the window
    assert float(rows[("stgcon", "1")]["tokens_per_second"]) == 90.0
    assert float(rows[("stgcon", "1")]["final_loss"]) == pytest.approx((2.0 + 3.0) / 2)
    assert rows[("stgcon", "1")]["train_seconds"] == "12.5"
    assert "update_successful" not in rows[("stgcon", "1")]  # booleans are not metrics
    assert rows[("named", "1")]["acc_overall"] == "50.0"
    summary = (study / "summary.txt").read_text()
    assert "7 of 9 runs finished" in summary


def test_a_resumed_log_counts_each_step_once(tmp_path):
    from megatron_stgc.study.collect import last_steps, log_metrics

    # steps 1-5, the job died, resumed from the checkpoint of step 3: steps 4-6 again
    records = _log([1, 2, 3, 40, 50]) + [dict(r, iteration=r["iteration"] + 3)
                                        for r in _log([4, 5, 6])]
    window = last_steps(records, 3)
    assert [r["iteration"] for r in window] == [4, 5, 6]
    assert log_metrics(window, "mean")["tokens_per_second"] == pytest.approx(5.0)
    assert log_metrics(window, "median")["final_loss"] == pytest.approx(2.0)


def test_load_imbalance_columns_per_modality():
    from megatron_stgc.study.collect import log_metrics

    record = {"iteration": 1, "loss": 1.0, "tokens_per_expert_by_modality": {
        "layer_1": {"image": [10, 30], "text": [5, 5]},
        "layer_3": {"image": [20, 20], "text": [0, 0]}}}
    row = log_metrics([record], "mean")
    # layer 1: std 10 / mean 20 = 0.5; layer 3: 0 -> mean 0.25; text: only layer 1 counts
    assert row["image_load_cv"] == pytest.approx(0.25)
    assert row["text_load_cv"] == pytest.approx(0.0)


def test_t_quantile_matches_the_table():
    for dof, value in T_TABLE.items():
        assert t_quantile(0.975, dof) == pytest.approx(value, abs=1e-3)


def test_collect_only_reads_study_json_and_a_broken_log_names_the_file(study):
    log = study / "runs" / "stgcon" / "seed3" / "train_log.jsonl"
    with open(log, "a") as f:
        f.write("{not json\n")
    code = study_main(["--collect", "--output", str(study)])
    assert code == 2
    os.remove(log)
    assert study_main(["--collect", "--output", str(study)]) == 0
    rows = _rows(study / "runs.csv")
    assert ("stgcon", "3") in {(r["point"], r["seed"]) for r in rows}
    assert all(r["ran_now"] == "False" for r in rows)
    assert (study / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (study / "plots" / "loss.png").is_file()  # megatron-stgc plot of the seed-1 runs
