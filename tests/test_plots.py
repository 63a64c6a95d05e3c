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
