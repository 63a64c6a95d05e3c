"""megatron-stgc study's grid files: points from axes, variations and names (the digits preset
gives docs/STUDY.md's six points), baselines, --axis / --variations / --points, point flags
checked against megatron-stgc train's before anything runs, placeholders, ``extends``, and
the local launcher's resume and failure handling on shell stages (real processes)."""

from __future__ import annotations

import os

import pytest

from megatron_stgc.study.cli import build_parser, main as study_main, plan_from_args
from megatron_stgc.study.grid_file import StudyError, load_grid_file
from megatron_stgc.study.templates import Templates

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples", "study")


def _plan(tmp_path, grid: str, *flags: str, extra=()):
    args, _ = build_parser().parse_known_args(
        ["--grid", grid, "--output", str(tmp_path / "out"), *flags])
    messages = []
    return plan_from_args(args, list(extra), messages.append), messages


def test_digits_preset_gives_the_documented_points(tmp_path):
    study, _ = _plan(tmp_path, os.path.join(EXAMPLES, "digits.yaml"))
    assert list(study.points) == [
        "baseline", "beta0.1_tau0_layersall", "beta0.3_tau0_layersall",
        "beta1.0_tau0_layersall", "beta1.0_tau-0.1_layersall", "beta1.0_tau0_layers2"]
    flags = study.points["beta1.0_tau-0.1_layersall"].flags
    assert flags[:5] == ["--stgc", "--stgc-beta", "1.0", "--stgc-tau", "-0.1"]
    assert study.points["baseline"].flags == ["--stgc", "--stgc-beta", "0"]
    assert set(study.baseline_of.values()) == {None, "baseline"}
    assert study.seeds == [1, 2, 3, 4, 5] and len(study.runs) == 30
    assert [s.stage for s in study.once.steps] == ["data", "stage2", "export"]
    assert [(j.point, j.seed) for j in study.runs[:7]] == [
        (p, 1) for p in study.points] + [("baseline", 2)]  # seed-major: interleaved


def test_axis_overrides_variations_and_names(tmp_path):
    study, _ = _plan(tmp_path, os.path.join(EXAMPLES, "digits.yaml"), "--axis", "beta=0.5",
                     "--axis", "layers=all;1,3", "--axis", "estimator=exact,lowrank",
                     "--variations", "normalization=tokens", "--seeds", "7")
    assert list(study.points)[1:] == [
        "beta0.5_tau0_layersall", "beta0.5_tau0_layersall_lowrank", "beta0.5_tau0_layers1+3",
        "beta0.5_tau0_layers1+3_lowrank", "beta1.0_tau-0.1_layersall",
        "beta1.0_tau0_layers2", "beta0.5_tau0_layersall_normtokens"]
    assert study.points["beta0.5_tau0_layers1+3"].flags[5:7] == ["--stgc-layers", "1,3"]
    assert study.seeds == [7]
    with pytest.raises(StudyError, match="--axis gamma: no such axis"):
        _plan(tmp_path, os.path.join(EXAMPLES, "digits.yaml"), "--axis", "gamma=1")
    with pytest.raises(StudyError, match="unknown axis 'gamma'"):
        _plan(tmp_path, os.path.join(EXAMPLES, "digits.yaml"), "--variations", "gamma=2")


def test_points_selection_keeps_the_baseline(tmp_path):
    study, _ = _plan(tmp_path, os.path.join(EXAMPLES, "digits.yaml"), "--points",
                     "beta0.3_tau0_layersall")
    assert list(study.points) == ["baseline", "beta0.3_tau0_layersall"]


def test_per_axis_baselines_and_invalid_points_left_out(tmp_path):
    study, messages = _plan(tmp_path, os.path.join(EXAMPLES, "scaling_cpu.yaml"))
    assert len(study.points) == 13  # the old --quick grid
    assert not any(name.startswith("W1_EP2") for name in study.points)
    assert any("W1_EP2_E4_top2_off left out" in m and "--expert-model-parallel-size" in m
               for m in messages)
    assert study.baseline_of["W2_EP2_E4_top2_two-pass"] == "W2_EP2_E4_top2_off"
    assert study.baseline_of["W2_EP2_E8_top2_exact"] == "W2_EP2_E8_top2_off"
    assert study.baseline_of["W2_EP2_E4_top2_off"] is None
    assert {s.nproc_per_node for j in study.runs for s in j.steps
            if j.point.startswith("W2")} == {2}


def test_a_misspelled_flag_fails_before_anything_runs(tmp_path):
    with pytest.raises(StudyError, match="not megatron-stgc train flags: --stgc-bta"):
        _plan(tmp_path, os.path.join(EXAMPLES, "digits.yaml"), extra=["--stgc-bta", "1"])
    with pytest.raises(StudyError, match="bad flag value"):
        _plan(tmp_path, os.path.join(EXAMPLES, "digits.yaml"), "--axis", "beta=high")


def test_grid_file_errors_name_the_file_and_key(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("stage: {}\n")
    with pytest.raises(StudyError, match=f"{grid}: unknown key.*stage"):
        load_grid_file(str(grid))
    grid.write_text(f"extends: {grid}\n")
    with pytest.raises(StudyError, match="'extends' loops back"):
        load_grid_file(str(grid))
    grid.write_text("points: {'bad name': []}\nstages: {t: {command: ['true']}}\n")
    with pytest.raises(StudyError, match="points.bad name"):
        _plan(tmp_path, str(grid))
    grid.write_text("points: {a: []}\nstages: {t: {command: ['true'], shell: x}}\n")
    with pytest.raises(StudyError, match="stages.t: exactly one of command"):
        _plan(tmp_path, str(grid))


def test_extends_merges_and_null_removes(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {os.path.join(EXAMPLES, 'digits.yaml')}\n"
                     "stages: {stage2: null, export: null}\nvars: {dense_iters: 5}\n")
    spec = load_grid_file(str(child))
    assert list(spec["stages"]) == ["data", "train", "eval"]
    assert spec["vars"]["dense_iters"] == 5 and spec["vars"]["stage3_iters"] == 300
    assert spec["base"] == os.path.join(REPO, "examples", "tiny_llava_digits.yaml")


def test_placeholders():
    templates = Templates({"a": "x", "flags": ["--f", "{a}"], "b": "{a}/y", "loop": "{loop}",
                           "spaced": "two words"}, "stages.t")
    assert templates.tokens(["run", "{flags}", "--p={b}", "{{literal}}"]) == [
        "run", "--f", "x", "--p=x/y", "{literal}"]
    assert templates.tokens("run {flags} {b}") == ["run", "--f", "x", "x/y"]
    assert templates.shell("echo {spaced} {flags} > {b}") == "echo 'two words' --f x > x/y"
    with pytest.raises(StudyError, match=r"stages.t: unknown placeholder \{nope\}"):
        templates.tokens(["{nope}"])
    with pytest.raises(StudyError, match="is a list"):
        templates.tokens(["--x={flags}"])
    with pytest.raises(StudyError, match="nest more than"):
        templates.tokens(["{loop}"])


SHELL_GRID = """
seeds: [1, 2]
points: {{a: [], b: []}}
stages:
  prepare: {{scope: once, shell: "echo ready > {{output}}/prepared"}}
  work: {{scope: run, shell: "mkdir -p {{run_dir}} && echo {{point}} {{seed}} > {{run_dir}}/work"}}
  check: {{scope: run, shell: "{check}"}}
"""


def test_local_launcher_stops_at_a_failure_names_it_and_resumes(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    # run b/seed1's check stage fails; everything else succeeds
    grid.write_text(SHELL_GRID.format(check='test {point}{seed} != b1 || exit 3'))
    out = tmp_path / "out"
    assert study_main(["--grid", str(grid), "--output", str(out)]) == 2
    error = capsys.readouterr().err
    failed = out / "runs" / "b" / "seed1"
    assert "b/seed1: stage check failed (exit code 3)" in error
    assert str(failed / "check.out") in error
    assert (failed / "work.done").exists() and not (failed / "check.done").exists()
    assert not (out / "runs" / "a" / "seed2").exists()  # nothing started after the failure
    grid.write_text(SHELL_GRID.format(check="true"))
    work_time = os.path.getmtime(failed / "work.done")
    assert study_main(["--grid", str(grid), "--output", str(out), "--jobs", "2"]) == 0
    output = capsys.readouterr().out
    assert "(3 ran in this call)" in output  # b/seed1 (its check), a/seed2, b/seed2
    assert os.path.getmtime(failed / "work.done") == work_time  # finished stages not rerun
    assert (out / "runs" / "b" / "seed2" / "work").read_text() == "b 2\n"
    assert (out / "prepared").read_text() == "ready\n"


def test_set_base_changes_the_commands_and_the_checks(tmp_path):
    other = os.path.join(REPO, "examples", "tiny_moe_cpu.yaml")
    study, _ = _plan(tmp_path, os.path.join(EXAMPLES, "digits.yaml"), "--set", f"base={other}",
                     "--points", "baseline")
    train = {s.stage: s for s in study.runs[0].steps}["train"].argv
    assert train[train.index("--config") + 1] == other
    with pytest.raises(StudyError, match="not megatron-stgc train flags"):
        _plan(tmp_path, os.path.join(EXAMPLES, "digits.yaml"), "--set",
              f"base={os.path.join(REPO, 'examples', 'tiny_llava_digits.yaml')}",
              extra=["--no-such-flag"])


def test_named_points_bring_their_own_baselines(tmp_path):
    study, _ = _plan(tmp_path, os.path.join(EXAMPLES, "screens.yaml"))
    assert study.baseline_of["beta1_text"] == "baseline"
    assert study.baseline_of["lowlr_beta1"] == "lowlr_baseline"
    assert study.baseline_of["lowlr_baseline"] is None  # "none" overrides the file's baseline
    assert study.baseline_of["mb16_beta1"] == "mb16_baseline"
    assert study.baseline_of["baseline"] is None
    study, _ = _plan(tmp_path, os.path.join(EXAMPLES, "screens.yaml"), "--points", "mb16_beta1")
    assert list(study.points) == ["mb16_baseline", "mb16_beta1"]
    grid = tmp_path / "bad.yaml"
    grid.write_text(f"extends: {os.path.join(EXAMPLES, 'digits.yaml')}\ngrid: null\n"
                    "points:\n  a: [--stgc]\n  b: {flags: [--stgc], baseline: c}\n")
    with pytest.raises(StudyError, match="points.b.baseline: no other point named 'c'"):
        _plan(tmp_path, str(grid))
