"""The digits study preset (examples/study/digits.yaml) with the local launcher on a 2-point x
2-seed grid, a few steps each (real torchrun jobs on the digits mix, one process each, two
runs at a time): runs.csv has one row per (point, seed), summary.csv one per point with the
paired difference to the baseline, the PNGs are written, and a second call re-runs nothing.
And the preset's commands are the main job's recipe (tools/digits_main_job.py)."""

import csv
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY = os.path.join(REPO, "tools", "study.py")
DIGITS = os.path.join(REPO, "examples", "study", "digits.yaml")
POINT = "beta1.0_tau0_layersall"

# the preset at test size: stage II and III 3 steps, the first 10 validation questions
TEST_GRID = f"""
extends: {DIGITS}
nproc_per_node: 1
vars:
  dense_iters: 3
  stage3_iters: 3
  questions: "{{output}}/q10.jsonl"
  answers: "{{output}}/a10.jsonl"
grid:
  axes:
    beta: {{values: [1.0]}}
  variations: []
stages:
  subset:
    scope: once
    shell: "head -n 10 {{data}}/val_questions.jsonl > {{questions}} &&
            head -n 10 {{data}}/val_answers.jsonl > {{answers}}"
"""
SMALL = ["--log-interval", "1", "--vision-num-layers", "1", "--num-layers", "2",
         "--expert-model-parallel-size", "1"]


def _study(grid, out):
    command = [sys.executable, STUDY, "--grid", str(grid), "--output", str(out), "--seeds",
               "1,2", "--jobs", "2", "--", *SMALL]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_study_grid_writes_csvs_pngs_and_resumes_without_rerunning(tmp_path):
    grid, out = tmp_path / "grid.yaml", tmp_path / "study"
    grid.write_text(TEST_GRID)
    first = _study(grid, out)
    rows = _rows(out / "runs.csv")
    assert [(r["point"], r["seed"]) for r in rows] == [
        ("baseline", "1"), (POINT, "1"), ("baseline", "2"), (POINT, "2")]
    assert all(r["ran_now"] == "True" for r in rows)
    assert all(0.0 <= float(r["acc_overall"]) <= 100.0 for r in rows)
    assert all(r["conflict_fraction"] for r in rows)  # measured on the baseline too (beta 0)
    assert [r["beta"] for r in rows] == ["", "1.0", "", "1.0"]  # axis columns
    with open(out / "runs" / POINT / "seed2" / "results.json") as f:
        assert f"{100 * json.load(f)['overall']['accuracy']}" == rows[3]["acc_overall"]
    summary = _rows(out / "summary.csv")
    assert [s["point"] for s in summary] == ["baseline", POINT]
    assert summary[1]["acc_overall_diff"] != "" and summary[0]["seeds"] == "2"
    paired = [float(rows[i + 1]["acc_overall"]) - float(rows[i]["acc_overall"]) for i in (0, 2)]
    assert float(summary[1]["acc_overall_diff"]) == pytest.approx(sum(paired) / 2)
    assert os.path.getsize(out / "study.png") > 10_000
    assert os.path.isfile(out / "plots" / "expert_load_over_time.png")
    assert "[4/4]" in first and "(4 ran in this call)" in first

    trained = os.path.getmtime(out / "runs" / "baseline" / "seed1" / "train.out")
    second = _study(grid, out)
    assert all(r["ran_now"] == "False" for r in _rows(out / "runs.csv"))
    assert "(0 ran in this call)" in second and "export, subset): done before" in second
    assert os.path.getmtime(out / "runs" / "baseline" / "seed1" / "train.out") == trained


def test_the_preset_runs_the_main_jobs_recipe(tmp_path):
    """Stage II and stage III as examples/study/digits.yaml writes them parse to the same
    configurations as tools/digits_main_job.py's (DENSE, STAGE3, stage3_flags)."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import digits_main_job as job

    from megatron_stgc.config import parse_run_config
    from megatron_stgc.study.cli import main as study_main
    from megatron_stgc.study.plan import load_study

    out = tmp_path / "study"
    assert study_main(["--grid", DIGITS, "--output", str(out), "--launcher", "slurm",
                       "--seeds", "3", "--", *SMALL]) == 0
    study = load_study(str(out))
    data = str(out / "data")
    common = ["--config", os.path.join(REPO, "examples", "tiny_llava_digits.yaml"),
              "--data-path", f"{data}/train.json", "--image-root", data, "--cache-dir",
              str(out / "cache"), "--seed", "1234"]
    dense = {s.stage: s for s in study.once.steps}["stage2"].argv
    expected = job.run_flags_for(common, str(out / "dense"), SMALL + job.DENSE + [
        "--train-iters", "400"])
    assert parse_run_config(dense[3:]).to_dict() == parse_run_config(expected).to_dict()
    run = next(j for j in study.runs if j.point == POINT)
    train = {s.stage: s for s in run.steps}["train"].argv
    flags = study.points[POINT].flags + ["--seed", "3"] + SMALL
    expected = job.stage3_flags(common, str(out / "dense" / "pretrained"), 300, run.directory,
                                flags)
    assert train[:3] == ["-m", "megatron_stgc", "train"]
    assert parse_run_config(train[3:]).to_dict() == parse_run_config(expected).to_dict()
    assert study.points["baseline"].flags == job.RUNS["baseline"]
