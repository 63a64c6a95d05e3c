"""The GPU check's multi-GPU mode (``--gpus N``), run on the CPU: N gloo processes under
torchrun against one process, through the same worker and comparison code a GPU run uses
(tools/gpucheck/layouts.py, digits_layout.py). Says nothing about NCCL or GPUs.
The comparisons are sharp: each rejects a result that differs where the math says not."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_CHECK = os.path.join(REPO, "tools", "gpu_check.py")
sys.path[:0] = [os.path.join(REPO, "tools")]

from gpucheck import digits_layout, layouts  # noqa: E402

LAYOUT_CHECKS = ("layout-expert-dp", "layout-ep", "layout-previous-step", "layout-ltdr-digits")


def test_every_layout_check_passes_on_two_gloo_processes(tmp_path):
    pytest.importorskip("sklearn")  # the digits data of layout-ltdr-digits
    done = subprocess.run([sys.executable, GPU_CHECK, "--device", "cpu", "--gpus", "2",
                           "--only", ",".join(LAYOUT_CHECKS), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=1800, cwd=REPO)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    with open(tmp_path / "gpu_check.json") as f:
        checks = {c["check"]: c for c in json.load(f)["checks"]}
    assert {name: c["status"] for name, c in checks.items()} == \
        {name: "passed" for name in LAYOUT_CHECKS}
    assert "overlapped backwards per rank [1, 1]" in checks["layout-expert-dp"]["detail"]
    assert "STGC + LTDR" in checks["layout-ep"]["detail"]
    assert "tail tokens routed to top-a" in checks["layout-ep"]["detail"]
    assert "step 3:" in checks["layout-previous-step"]["detail"]
    assert "2 ranks (expert-DP 2) == 1 process" in checks["layout-ltdr-digits"]["detail"]


# -- the comparisons fail where they must ----------------------------------------------------

def _reference(split: int = 2, experts: int = 4, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    rows = layouts.SEQ * layouts.PER_RANK * split
    cos = torch.rand(rows, experts, generator=gen) * 2 - 1
    cos[torch.rand(rows, experts, generator=gen) < 0.5] = float("nan")
    return {"cos": cos, "conflicts": cos < 0, "router_grad": torch.randn(experts, 16, generator=gen),
            "tail": torch.rand(rows, generator=gen) < 0.2,
            "routing_map": ~torch.isnan(cos)}


def _ranks(reference: dict, split: int = 2) -> list[dict]:
    return [{"cos": layouts._rows(reference["cos"], r, split).clone(),
             "conflicts": layouts._rows(reference["conflicts"], r, split).clone(),
             "router_grad": reference["router_grad"].clone(),
             "tail": layouts._rows(reference["tail"][:, None], r, split)[:, 0].clone(),
             "routing_map": layouts._rows(reference["routing_map"], r, split).clone()}
            for r in range(split)]


def _judged_index(cos: torch.Tensor) -> tuple[int, int]:
    row, col = torch.nonzero(~torch.isnan(cos) & (cos.abs() > 0.1))[0].tolist()
    return row, col


def test_layer_comparison_accepts_the_same_numbers_split_by_rank():
    reference = _reference()
    worst = layouts.compare_reports(reference, _ranks(reference))
    assert worst["cos"] == 0 and worst["conflicts"] > 0
    assert layouts.compare_tail_routing(reference, _ranks(reference)) > 0


@pytest.mark.parametrize("change,message", [
    ("cos", "cosines differ"), ("flag", "conflict flags differ"),
    ("router_grad", "router gradient differs"), ("judged", "judged pairs differ"),
    ("swap", "differ")])
def test_layer_comparison_rejects_a_difference(change, message):
    reference = _reference()
    ranks = _ranks(reference)
    row, col = _judged_index(ranks[1]["cos"])
    if change == "cos":
        ranks[1]["cos"][row, col] += 1e-4
    elif change == "flag":
        ranks[1]["conflicts"][row, col] = ~ranks[1]["conflicts"][row, col]
    elif change == "router_grad":
        ranks[0]["router_grad"][0, 0] += 1e-4
    elif change == "judged":
        ranks[1]["cos"][row, col] = float("nan")
    else:  # rank 1 handed rank 0's rows: the split must be the sampler's
        ranks[0], ranks[1] = ranks[1], ranks[0]
    with pytest.raises(AssertionError, match=message):
        layouts.compare_reports(reference, ranks)


def test_tail_comparison_rejects_a_different_tail_token():
    reference = _reference()
    ranks = _ranks(reference)
    ranks[0]["tail"][3] = ~ranks[0]["tail"][3]
    with pytest.raises(AssertionError, match="tail tokens differ"):
        layouts.compare_tail_routing(reference, ranks)


def test_global_expert_names_for_both_expert_layouts():
    assert layouts.global_name("experts.local_experts.1.linear_fc1.weight", 2) == \
        "experts.local_experts.3.linear_fc1.weight"
    assert layouts.global_name("experts.linear_fc2.weight1", 2) == "experts.linear_fc2.weight3"
    assert layouts.global_name("experts.linear_fc1.bias0", 2) == "experts.linear_fc1.bias2"
    assert layouts.global_name("router.weight", 2) == "router.weight"


def _records(loss=2.0, fraction=0.25):
    return [{"loss": loss + step, "grad_norm": 1.5, "stgc/conflict_fraction": fraction,
             "ltdr/tail_fraction": 0.4, "ltdr/experts_per_vision_token": 2.3}
            for step in range(digits_layout.STEPS)]


def test_digits_comparison_accepts_equal_runs_and_rejects_a_difference():
    digits_layout.compare_records(_records(), _records(loss=2.0 + 1e-6))
    with pytest.raises(AssertionError, match="loss"):
        digits_layout.compare_records(_records(), _records(loss=2.01))
    with pytest.raises(AssertionError, match="conflict_fraction"):
        digits_layout.compare_records(_records(), _records(fraction=0.26))
    with pytest.raises(AssertionError, match="not logged"):
        digits_layout.compare_records(_records(), [{"loss": 2.0}] * digits_layout.STEPS)


def test_digits_check_trains_on_equal_length_answers_only(tmp_path):
    records = [
        {"id": "a", "image": "x.png", "conversations": [{"value": "q"}, {"value": "yes"}]},
        {"id": "b", "image": "y.png", "conversations": [{"value": "q"}, {"value": "no"}]},
        {"id": "c", "conversations": [{"value": "q"}, {"value": "yes"}]},  # text-only
        {"id": "d", "image": "z.png", "conversations": [{"value": "q"}, {"value": "7"}]},
    ]
    source, output = tmp_path / "train.json", tmp_path / "yes.json"
    source.write_text(json.dumps(records))
    assert digits_layout.yes_answers(str(source), str(output)) == 1
    assert [r["id"] for r in json.loads(output.read_text())] == ["a"]
