"""tools/study.py on a 2-point x 2-seed grid with a few steps each (real torchrun jobs on the
digits mix, one process each to keep it short): runs.csv has one row per (point, seed), summary.csv one per point with the paired
difference to the baseline, a PNG is written, and a second call re-runs nothing."""

import argparse
import csv
import importlib.util
import os
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY = os.path.join(REPO, "tools", "study.py")


def _study(out, *extra):
    command = [sys.executable, STUDY, "--output", str(out), "--seeds", "1,2", "--betas", "1.0",
               "--dense-iters", "3", "--stage3-iters", "3", "--eval-limit", "10", "--nproc", "1",
               *extra, "--", "--log-interval", "1", "--vision-num-layers", "1", "--num-layers",
               "2", "--expert-model-parallel-size", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_study_grid_writes_csvs_png_and_resumes_without_rerunning(tmp_path):
    out = tmp_path / "study"
    first = _study(out)
    rows = _rows(out / "runs.csv")
    assert [(r["point"], r["seed"]) for r in rows] == [
        ("baseline", "1"), ("beta1.0_tau0_layersall", "1"),
        ("baseline", "2"), ("beta1.0_tau0_layersall", "2")]
    assert all(r["ran_now"] == "True" for r in rows)
    assert all(0.0 <= float(r["acc_overall"]) <= 100.0 for r in rows)
    assert all(r["conflict_fraction"] for r in rows)  # measured on the baseline too (beta 0)
    summary = _rows(out / "summary.csv")
    assert [s["point"] for s in summary] == ["baseline", "beta1.0_tau0_layersall"]
    assert summary[1]["acc_overall_diff"] != "" and summary[0]["seeds"] == "2"
    assert os.path.getsize(out / "study.png") > 10_000
    assert "[4/4]" in first and "runs (4 run now)" in first

    trained = os.path.getmtime(out / "runs" / "baseline" / "seed1" / "train.out")
    second = _study(out)
    assert all(r["ran_now"] == "False" for r in _rows(out / "runs.csv"))
    assert "runs (0 run now)" in second and "stage II reused" in second
    assert os.path.getmtime(out / "runs" / "baseline" / "seed1" / "train.out") == trained


def _load_tool():
    spec = importlib.util.spec_from_file_location("study", STUDY)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_extra_points_change_one_axis_from_the_grids_first_values():
    tool = _load_tool()
    args = argparse.Namespace(betas="0.1,1.0", taus="0", layers="all", estimators="exact",
                              normalizations="pairs", extra_points="beta=1.0,tau=-0.1;layers=2")
    points = tool.grid_points(args)
    assert list(points) == ["baseline", "beta0.1_tau0_layersall", "beta1.0_tau0_layersall",
                            "beta1.0_tau-0.1_layersall", "beta0.1_tau0_layers2"]
    flags = points["beta1.0_tau-0.1_layersall"]
    assert flags[flags.index("--stgc-tau") + 1] == "-0.1"
    assert flags[flags.index("--stgc-beta") + 1] == "1.0"
    args.extra_points = "gamma=2"
    with pytest.raises(SystemExit, match="unknown axis 'gamma'"):
        tool.grid_points(args)


def test_with_ltdr_adds_ltdr_and_stgc_ltdr_points():
    tool = _load_tool()
    args = argparse.Namespace(betas="1.0", taus="0", layers="all", estimators="exact",
                              normalizations="pairs", extra_points=None, with_ltdr=True)
    points = tool.grid_points(args)
    assert list(points) == ["baseline", "beta1.0_tau0_layersall", "ltdr",
                            "beta1.0_tau0_layersall_ltdr"]
    assert points["ltdr"] == points["baseline"] + ["--ltdr"]
    assert points["beta1.0_tau0_layersall_ltdr"][-1] == "--ltdr"
