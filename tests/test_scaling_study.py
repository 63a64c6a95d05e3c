"""tools/scaling_study.py: real torchrun jobs on a 2-point grid -> CSV rows and a PNG plot."""

from __future__ import annotations

import csv
import importlib.util
import os
import sys

from launch_utils import REPO, Job

sys.path.insert(0, os.path.join(REPO, "tools"))
import scaling_study  # noqa: E402


def test_grids_respect_the_layout_rules():
    for point in scaling_study.full_grid([1, 2, 4], [4, 8], [1, 2, 3]):
        assert point.world % point.ep == 0 and point.experts % point.ep == 0
        assert 2 <= point.topk <= point.experts
    quick = scaling_study.quick_grid()
    assert len(quick) == 13 and max(p.world for p in quick) == 2
    assert {p.stgc for p in quick} == {"off", *scaling_study.STGC_VARIANTS}


def test_two_point_study_writes_csv_and_plot(tmp_path):
    command = [sys.executable, os.path.join(REPO, "tools", "scaling_study.py"), "--quick",
               "--limit", "2", "--steps", "3", "--warmup", "1", "--out-dir", str(tmp_path),
               "--name", "study", "--num-layers", "2", "--hidden-size", "32",
               "--ffn-hidden-size", "64", "--moe-ffn-hidden-size", "32", "--seq-length", "32",
               "--num-samples", "400", "--vocab-size", "128", "--global-batch-size", "8",
               "--micro-batch-size", "2"]
    with Job(command, str(tmp_path / "study.out")) as job:
        code = job.wait(timeout=300)
        output = job.output()
    assert code == 0, output[-4000:]
    with open(tmp_path / "study.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["world"], r["ep"], r["stgc"]) for r in rows] == [("1", "1", "off"),
                                                               ("1", "1", "single-pass/exact")]
    assert all(float(r["tokens_per_second"]) > 0 for r in rows)
    off, on = (float(r["tokens_per_second"]) for r in rows)
    assert abs(float(rows[1]["stgc_overhead"]) - (1 - on / off)) < 1e-3
    assert rows[0]["conflict_fraction"] == "" and 0 <= float(rows[1]["conflict_fraction"]) <= 1
    if importlib.util.find_spec("matplotlib") is not None:  # .ci/run installs .[plot]
        with open(tmp_path / "study.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
