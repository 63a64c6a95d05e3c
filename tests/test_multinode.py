"""Multi-node on one machine: two torchrun agents (one per "node") train together.

Two agents with ``--nnodes 2 --nproc-per-node 1`` meet through c10d rendezvous on
127.0.0.1 and train the tiny MoE job (EP=2 across the two "nodes"); their
per-step losses, grad norms and expert loads equal those of one agent with
``--nnodes 1 --nproc-per-node 2``.
"""

from __future__ import annotations

import os

from launch_utils import (TINY_FLAGS, Job, free_port, read_jsonl, run_job, torchrun_command)

STEPS = 6


def _flags(out: str, cache: str) -> list[str]:
    return [*TINY_FLAGS, "--train-iters", str(STEPS), "--save", out, "--load", out,
            "--log-file", f"{out}/log.jsonl", "--cache-dir", cache]


def test_two_agents_match_one_agent(tmp_path):
    cache = str(tmp_path / "cache")
    single = str(tmp_path / "single")
    output = run_job(torchrun_command(_flags(single, cache), nnodes=1, nproc_per_node=2),
                     str(tmp_path / "single.out"))
    assert "world 2 (TP 1, EP 2, DP 2)" in output

    multi = str(tmp_path / "multi")
    port = free_port()
    jobs = [Job(torchrun_command(_flags(multi, cache), nnodes=2, nproc_per_node=1, port=port,
                                 node_rank=node, rdzv_id="two-nodes"),
                str(tmp_path / f"node{node}.out"))
            for node in (0, 1)]
    try:
        codes = [job.wait(timeout=240) for job in jobs]
        outputs = [job.output() for job in jobs]
        assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)
    finally:
        for job in jobs:
            if job.process.poll() is None:
                job.kill_group()
    # exactly one agent hosts global rank 0 and prints the layout
    assert sum("world 2 (TP 1, EP 2, DP 2)" in o for o in outputs) == 1, outputs

    a, b = read_jsonl(f"{single}/log.jsonl"), read_jsonl(f"{multi}/log.jsonl")
    assert [r["iteration"] for r in a] == list(range(1, STEPS + 1))
    assert [r["iteration"] for r in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        assert x["loss"] == y["loss"], (x["iteration"], x["loss"], y["loss"])
        assert x["grad_norm"] == y["grad_norm"]
        assert x["tokens_per_expert"] == y["tokens_per_expert"]
    assert a[-1]["loss"] < a[0]["loss"]
    assert os.path.isdir(os.path.join(multi, f"iter_{STEPS:07d}"))
