"""tools/gpu_check.py's harness, run here on the CPU (``--device cpu``, gloo) so that the
GPU acceptance check keeps working between GPU sessions. This says nothing about GPUs: it
runs the same check code with CPU tensors and shows the table and exit code are right."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_harness_runs_its_checks_on_the_cpu(tmp_path):
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "gpu_check.py"), "--device", "cpu",
         "--only", "nccl,stgc-modes,reference,te-fp8", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(tmp_path / "gpu_check.json") as f:
        report = json.load(f)
    status = {check["check"]: check["status"] for check in report["checks"]}
    assert status == {"nccl": "passed", "stgc-modes": "passed", "reference": "passed",
                      "te-fp8": "skipped"}
    assert "two-pass == single-pass" in report["checks"][1]["detail"]
    assert "3 passed, 0 failed, 1 skipped" in done.stdout


def test_gpu_check_rejects_unknown_checks():
    done = subprocess.run([sys.executable, os.path.join(REPO, "tools", "gpu_check.py"),
                           "--only", "no-such-check"], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 2 and "unknown checks" in done.stderr
