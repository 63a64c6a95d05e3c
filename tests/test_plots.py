"""megatron-stgc plot on saved logs (tests/fixtures/run_logs: 20 stage III steps of the digits
MoE-LLaVA with STGC and with beta 0, and 20 dense stage II steps without MoE or STGC)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGS = os.path.join(REPO, "tests", "fixtures", "run_logs")
FIGURES = ["loss.png", "conflict_fraction.png", "conflict_routing_score.png",
           "gradient_consistency.png", "expert_load_final.png", "expert_load_over_time.png"]


def _plot(*args):
    return subprocess.run([sys.executable, "-m", "megatron_stgc", "plot", *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_writes_every_figure_for_stgc_runs(tmp_path):
    done = _plot(os.path.join(LOGS, "stgc"), os.path.join(LOGS, "baseline"),
                 "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(os.listdir(tmp_path)) == sorted(FIGURES)
    assert all(_is_png(tmp_path / name) and os.path.getsize(tmp_path / name) > 10_000
               for name in FIGURES)


def test_a_log_without_stgc_metrics_is_named_not_a_crash(tmp_path):
    done = _plot(os.path.join(LOGS, "dense"), "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "dense: no stgc/* metrics in its log" in done.stdout
    assert "conflict_fraction.png: no run has the data for it" in done.stdout
    assert os.listdir(tmp_path) == ["loss.png"]


def test_a_missing_log_is_a_clear_error(tmp_path):
    done = _plot(str(tmp_path / "nothing-here"))
    assert done.returncode == 2 and "no train_log.jsonl" in done.stdout


def test_runs_whose_directories_share_a_name_get_distinct_labels(tmp_path, monkeypatch):
    """The study's runs are all 'seed1': each must keep its own curves and label (the
    expert-load-over-time figure used to show one run under both names)."""
    import shutil

    from matplotlib.figure import Figure

    from megatron_stgc.analysis.plots import write_plots

    dirs = []
    for point, source in (("beta1", "stgc"), ("baseline", "baseline")):
        run = tmp_path / "runs" / point / "seed1"
        run.mkdir(parents=True)
        shutil.copy(os.path.join(LOGS, source, "train_log.jsonl"), run / "train_log.jsonl")
        dirs.append(str(run))
    seen = {}
    original = Figure.savefig

    def record(fig, path, *args, **kwargs):
        seen[os.path.basename(path)] = [
            (ax.get_title(), [tuple(line.get_ydata()) for line in ax.lines],
             [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else [])
            for ax in fig.axes]
        return original(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    write_plots(dirs, str(tmp_path / "plots"), say=lambda message: None)
    over_time = seen["expert_load_over_time.png"]
    assert [title for title, _, _ in over_time] == [
        "beta1/seed1: layer_1", "beta1/seed1: layer_3",
        "baseline/seed1: layer_1", "baseline/seed1: layer_3"]
    assert over_time[0][1] != over_time[2][1]  # two runs' curves, not one run twice
    assert seen["loss.png"][0][2] == ["beta1/seed1", "baseline/seed1"]


def test_run_labels():
    from megatron_stgc.analysis.plots import run_labels

    assert run_labels(["/x/a/seed1", "/x/b/seed1"]) == ["a/seed1", "b/seed1"]
    assert run_labels(["/x/runs/stgc"]) == ["stgc"]
    assert run_labels(["/x/a/train_log.jsonl", "/x/b/train_log.jsonl"]) == ["a", "b"]
    assert run_labels(["/x/one.jsonl", "/x/two.jsonl"]) == ["one", "two"]
    assert run_labels(["/x/a", "/x/a"]) == ["a", "a #2"]
