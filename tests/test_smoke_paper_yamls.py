"""The paper YAMLs build at real widths (2 LM layers, 2 ViT layers) from a converted random
checkpoint and take 2 stage-III steps on CPU with --stgc --ltdr (tools/smoke_paper_yamls.py).

Slow (minutes per family on 2 CPU cores): ``python -m pytest -m slow tests/test_smoke_paper_yamls.py``.
A family whose converter is not in the tree is skipped, not failed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from launch_utils import REPO

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("family", ["stablelm", "phi2", "qwen"])
def test_stage3_yaml_takes_two_steps(tmp_path, family):
    done = subprocess.run([sys.executable, os.path.join(REPO, "tools", "smoke_paper_yamls.py"),
                           "--output", str(tmp_path), "--families", family],
                          capture_output=True, text=True, timeout=3600, cwd=REPO)
    with open(tmp_path / "smoke.json") as f:
        (result,) = json.load(f)
    if result["status"].startswith("skipped"):
        pytest.skip(f"{family}: {result['detail']}")
    assert done.returncode == 0 and result["status"] == "ok", done.stdout[-4000:]
    assert [s["iteration"] for s in result["steps"]] == [1, 2]
    assert all(math.isfinite(s["loss"]) for s in result["steps"])
    assert all(s["stgc_conflict_fraction"] is not None and s["ltdr_tail_fraction"] is not None
               for s in result["steps"])
