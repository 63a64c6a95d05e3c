"""tools/gpu_check.py's harness, run here on the CPU (``--device cpu``, gloo) so that the
GPU acceptance check keeps working between GPU sessions. This says nothing about GPUs: it
runs the same check code with CPU tensors and shows the table and exit code are right.
Deadlines and process cleanup: test_gpu_check_processes.py; TF32: test_gpu_check_tf32.py;
the multi-GPU checks: test_gpu_check_layouts.py."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_CHECK = os.path.join(REPO, "tools", "gpu_check.py")
sys.path[:0] = [os.path.join(REPO, "tools")]

import gpu_check  # noqa: E402


def _report(out_dir) -> dict:
    with open(os.path.join(out_dir, "gpu_check.json")) as f:
        return json.load(f)


def test_gpu_check_harness_runs_its_checks_on_the_cpu(tmp_path):
    done = subprocess.run(
        [sys.executable, GPU_CHECK, "--device", "cpu", "--only",
         "nccl,stgc-modes,reference,te-fp8,layout-ep", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = _report(tmp_path)
    status = {check["check"]: check["status"] for check in report["checks"]}
    assert status == {"nccl": "passed", "stgc-modes": "passed", "reference": "passed",
                      "te-fp8": "skipped", "layout-ep": "skipped"}
    details = {check["check"]: check["detail"] for check in report["checks"]}
    assert "two-pass == single-pass" in details["stgc-modes"]
    assert "router GEMM fp32" in details["reference"]
    assert details["te-fp8"] == "needs CUDA"
    assert "needs --gpus N >= 2" in details["layout-ep"]
    assert report["complete"] and report["exit_code"] == 0
    assert "3 passed, 0 failed, 2 skipped, 0 unfinished: PASS" in done.stdout


def test_gpu_check_rejects_unknown_checks():
    done = subprocess.run([sys.executable, GPU_CHECK, "--only", "no-such-check"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 2 and "unknown checks" in done.stderr


def test_checks_the_budget_did_not_reach_are_unfinished_and_fail_the_run(tmp_path):
    """A check that could run but was not started is not a pass: exit code 1."""
    code = gpu_check.main(["--device", "cpu", "--only", "nccl,bench,te-train",
                           "--budget-minutes", "0", "--out", str(tmp_path)])
    report = _report(tmp_path)
    assert code == 1 and report["exit_code"] == 1
    assert [c["status"] for c in report["checks"]] == ["unfinished"] * 3
    assert all("--budget-minutes" in c["detail"] for c in report["checks"])


def test_a_check_stopped_by_the_budget_is_unfinished_not_failed(tmp_path, monkeypatch):
    """The budget ends before the check's own limit: 'unfinished', named as such."""
    def slow(ctx):
        ctx.run([sys.executable, "-c", "import time; time.sleep(120)"])

    monkeypatch.setitem(gpu_check.jobs.CHECKS, "slow", slow)
    budget_end = gpu_check.time.monotonic() + 2
    outcome = gpu_check.run_check("slow", "cpu", str(tmp_path), budget_end=budget_end)
    assert outcome["status"] == "unfinished"
    assert "--budget-minutes" in outcome["detail"]


def test_eval_without_scikit_learn_is_skipped_with_the_reason(tmp_path, monkeypatch):
    """The bare CUDA machine may lack scikit-learn (the digits data): the check says so and
    the run still exits 0."""
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn -> ImportError
    code = gpu_check.main(["--device", "cpu", "--only", "eval", "--out", str(tmp_path)])
    (outcome,) = _report(tmp_path)["checks"]
    assert code == 0 and outcome["status"] == "skipped"
    assert "scikit-learn is not installed" in outcome["detail"]


def test_bench_runs_before_the_slow_job_checks():
    order = list(gpu_check.CHECKS)
    assert all(order.index("bench") < order.index(name)
               for name in ("train-resume", "export-load", "eval", "te-train", "te-fp8"))
    assert order.index("bench") < order.index("layout-expert-dp")


@pytest.mark.parametrize("statuses,code", [
    (["passed", "skipped"], 0), (["passed", "failed"], 1), (["passed", "unfinished"], 1),
    (["skipped"], 0)])
def test_exit_code_is_zero_only_when_every_check_passed_or_was_skipped(statuses, code):
    assert gpu_check.report.exit_code([{"status": s} for s in statuses]) == code
