"""The throughput grid (examples/study/scaling_cpu.yaml, what tools/scaling_study.py --quick
ran) through megatron-stgc study: real torchrun jobs on 2 points -> runs.csv / summary.csv rows
with tokens/s (median of the steps after warm-up), the STGC point's tokens/s ratio to STGC off
at the same layout, and the PNG."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import statistics
import sys

from launch_utils import REPO, Job

GRID = os.path.join(REPO, "examples", "study", "scaling_cpu.yaml")
SMALL = ["--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64",
         "--moe-ffn-hidden-size", "32", "--seq-length", "32", "--num-samples", "400",
         "--vocab-size", "128", "--global-batch-size", "8", "--micro-batch-size", "2"]


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_two_point_throughput_grid_writes_csvs_and_plot(tmp_path):
    out = tmp_path / "scaling"
    command = [sys.executable, "-m", "megatron_stgc", "study", "--grid", GRID, "--output",
               str(out), "--points", "W1_EP1_E4_top2_exact", "--set", "steps=6",
               "--", *SMALL]
    with Job(command, str(tmp_path / "study.out")) as job:
        code = job.wait(timeout=600)
        output = job.output()
    assert code == 0, output[-4000:]
    rows = _rows(out / "runs.csv")
    assert [(r["point"], r["world"], r["ep"], r["stgc"]) for r in rows] == [
        ("W1_EP1_E4_top2_off", "1", "1", "off"), ("W1_EP1_E4_top2_exact", "1", "1", "exact")]
    for row in rows:  # the median over the window of the run's own log
        with open(out / "runs" / row["point"] / "seed1" / "train_log.jsonl") as f:
            records = [json.loads(line) for line in f]
        assert [r["iteration"] for r in records] == [1, 2, 3, 4, 5, 6]
        expected = statistics.median(r["tokens_per_second"] for r in records)  # last 8 of 6
        assert float(row["tokens_per_second"]) == expected > 0
    off, on = (float(r["tokens_per_second"]) for r in rows)
    summary = _rows(out / "summary.csv")
    assert abs(float(summary[1]["tokens_per_second_ratio"]) - on / off) < 1e-9
    assert rows[0]["conflict_fraction"] == "" and 0 <= float(rows[1]["conflict_fraction"]) <= 1
    if importlib.util.find_spec("matplotlib") is not None:  # .ci/run installs .[plot]
        with open(out / "study.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
