"""Faults: a rank killed mid-run, and a checkpoint write interrupted mid-way.

* ``test_killed_rank_restarts_and_reproduces``: torchrun ``--max-restarts 1``;
  when the JSONL log shows step KILL_AFTER the test SIGKILLs global rank 1
  (found among the agent's children by its RANK environment variable). The
  agent restarts both workers, they resume from the newest complete
  checkpoint, and the job finishes with exactly the per-step losses, grad
  norms and data positions of an uninterrupted run: no sample repeated or
  skipped in the final history.
* ``test_interrupted_checkpoint_write``: the state a crash during the save of
  the last checkpoint leaves behind (tracker still on the previous one, a
  partial staging directory) loads the previous checkpoint, re-runs the lost
  steps identically and cleans the leftover up; ``--keep-last`` prunes.
"""

from __future__ import annotations

import os
import re
import shutil
import signal

import pytest

from launch_utils import (GLOBAL_BATCH, TINY_FLAGS, Job, final_records, read_jsonl, run_job,
                          torchrun_command, wait_for_iteration, worker_pid)

STEPS = 12
SAVE_INTERVAL = 4
KILL_AFTER = 6  # the kill lands after step 6 is logged (newest checkpoint: step 4)
TRACKER = "latest_checkpointed_iteration.txt"


def _flags(out: str, cache: str, *extra: str) -> list[str]:
    return [*TINY_FLAGS, "--train-iters", str(STEPS), "--save", out, "--load", out,
            "--save-interval", str(SAVE_INTERVAL), "--log-file", f"{out}/log.jsonl",
            "--cache-dir", cache, *extra]


def _tracker(root: str) -> int:
    with open(os.path.join(root, TRACKER)) as f:
        return int(f.read())


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    cache = str(root / "cache")
    out = str(root / "straight")
    run_job(torchrun_command(_flags(out, cache, "--keep-last", "2")), str(root / "straight.out"))
    return {"root": root, "cache": cache, "dir": out,
            "records": read_jsonl(f"{out}/log.jsonl")}


def _assert_same_history(reference: list[dict], records: list[dict]) -> None:
    final = final_records(records)
    assert [r["iteration"] for r in final] == list(range(1, STEPS + 1))
    for a, b in zip(reference, final):
        assert a["loss"] == b["loss"], (a["iteration"], a["loss"], b["loss"])
        assert a["grad_norm"] == b["grad_norm"], a["iteration"]
        assert a["lr"] == b["lr"], a["iteration"]
        assert a["tokens_per_expert"] == b["tokens_per_expert"], a["iteration"]
        # one global batch per step, no sample repeated or skipped
        assert b["consumed_samples"] == b["iteration"] * GLOBAL_BATCH


def test_killed_rank_restarts_and_reproduces(straight):
    root, out = straight["root"], str(straight["root"] / "killed")
    command = torchrun_command(_flags(out, straight["cache"]), max_restarts=1,
                               rdzv_id="fault-test")
    with Job(command, str(root / "killed.out")) as job:
        seen = wait_for_iteration(f"{out}/log.jsonl", KILL_AFTER, job, timeout=180)
        victim = worker_pid(job.pid, rank=1)
        os.kill(victim, signal.SIGKILL)
        code = job.wait(timeout=240)
        output = job.output()
    assert code == 0, output[-6000:]
    # the agent saw rank 1 die of the SIGKILL, then (same job) the workers started again
    assert f"failed (exitcode: -9) local_rank: 1 (pid: {victim})" in output, output[-4000:]
    assert output.count("world 2 (TP 1, EP 2, DP 2)") == 2
    match = re.search(rf"resumed from {re.escape(out)} at iteration (\d+) \((\d+) samples", output)
    assert match, output[-4000:]
    resumed_from, samples = int(match.group(1)), int(match.group(2))
    records = read_jsonl(f"{out}/log.jsonl")
    iterations = [r["iteration"] for r in records]
    # first attempt: steps 1..K (killed after K was logged); second: resumed_from+1..STEPS
    killed_after = len(records) - (STEPS - resumed_from)
    assert killed_after >= seen >= KILL_AFTER
    assert iterations == list(range(1, killed_after + 1)) + list(range(resumed_from + 1, STEPS + 1))
    # the newest checkpoint complete at the kill (or the one before, if the kill hit a save)
    newest = killed_after // SAVE_INTERVAL * SAVE_INTERVAL
    assert resumed_from in (newest, newest - SAVE_INTERVAL) and resumed_from >= SAVE_INTERVAL
    assert samples == resumed_from * GLOBAL_BATCH
    second = records[killed_after:]
    assert second[0]["consumed_samples"] == (resumed_from + 1) * GLOBAL_BATCH
    _assert_same_history(straight["records"], records)
    assert _tracker(out) == STEPS
    print(f"killed rank 1 (pid {victim}) after step {killed_after} was logged; "
          f"resumed from step {resumed_from} ({killed_after - resumed_from} steps re-run); "
          f"final loss {records[-1]['loss']}")


def test_interrupted_checkpoint_write(straight):
    src = straight["dir"]
    # --keep-last 2 kept only the two newest checkpoints
    entries = sorted(os.listdir(src))
    assert [e for e in entries if e.startswith("iter_")] == ["iter_0000008", "iter_0000012"]
    out = str(straight["root"] / "interrupted")
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("cache"))
    # Rebuild what a crash during the save of step 12 leaves: the files written so far
    # in a staging directory, the tracker still naming step 8, no iter_0000012.
    staging = os.path.join(out, "iter_0000012.tmp-1700000000000")
    os.replace(os.path.join(out, "iter_0000012"), staging)
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(staging) for f in fs)
    assert files
    for path in files[len(files) // 2:]:
        os.remove(path)
    with open(files[0], "r+b") as f:
        f.truncate(max(1, os.path.getsize(files[0]) // 3))
    with open(os.path.join(out, TRACKER), "w") as f:
        f.write("8\n")
    with open(f"{out}/log.jsonl") as f:  # the log as it stood after step 12 ran
        assert len(f.readlines()) == STEPS

    output = run_job(torchrun_command(_flags(out, straight["cache"], "--keep-last", "2")),
                     str(straight["root"] / "interrupted.out"))
    assert f"resumed from {out} at iteration 8 ({8 * GLOBAL_BATCH} samples consumed)" in output
    records = read_jsonl(f"{out}/log.jsonl")
    assert [r["iteration"] for r in records[STEPS:]] == [9, 10, 11, 12]
    _assert_same_history(straight["records"], records)
    assert _tracker(out) == STEPS
    entries = sorted(os.listdir(out))
    assert not [e for e in entries if ".tmp-" in e or ".replaced-" in e], entries
    assert [e for e in entries if e.startswith("iter_")] == ["iter_0000008", "iter_0000012"]


def test_leftover_cleanup_and_pruning_rules(tmp_path):
    """The file-system rules behind the above, on directories alone: a staging dir is
    removed, a checkpoint moved aside by a crash inside the publish rename is put back,
    --keep-last deletes only checkpoints older than the tracker's."""
    from megatron_stgc.training.checkpoint import (prune_checkpoints, published_iterations,
                                                   remove_leftovers)

    for name in ("iter_0000004", "iter_0000008", "iter_0000012", "iter_0000020",
                 "iter_0000016.tmp-111", "iter_0000012.replaced-222",
                 "iter_0000014.replaced-333"):
        os.makedirs(tmp_path / name / "sub")
    (tmp_path / "notes").mkdir()
    removed = remove_leftovers(str(tmp_path))
    # iter_12 exists, so its moved-aside copy is stale; iter_14 does not: restored
    assert removed == ["iter_0000012.replaced-222", "iter_0000016.tmp-111"]
    assert published_iterations(str(tmp_path)) == [4, 8, 12, 14, 20]
    assert prune_checkpoints(str(tmp_path), keep_last=2, current=12) == [4]
    # newer than the tracker (an abandoned timeline) is left alone
    assert published_iterations(str(tmp_path)) == [8, 12, 14, 20]
    assert (tmp_path / "notes").is_dir()
