"""Reading training logs: one JSONL record per log step, each covering ``steps`` steps.

A record (training/interval_metrics.py) covers the steps ``iteration - steps + 1 ..
iteration`` (logs written before records carried ``steps`` have one record per step). A run
resumed from an earlier checkpoint appends records for steps the log already holds; the later
records supersede the earlier ones (``last_steps`` skips the superseded ones).
"""

from __future__ import annotations

import json
from typing import Optional


def read_log(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def steps_of(record: dict) -> int:
    return int(record.get("steps", 1))


def first_step_of(record: dict) -> int:
    return record["iteration"] - steps_of(record) + 1


def last_steps(records: list[dict], count: int) -> list[dict]:
    """The records covering the run's last ``count`` steps (at least; whole records), oldest
    first; a record superseded by a later record of a resumed run is left out."""
    chosen, covered, frontier = [], 0, float("inf")
    for record in reversed(records):
        if "iteration" not in record or record["iteration"] >= frontier:
            continue
        chosen.append(record)
        covered += steps_of(record)
        frontier = first_step_of(record)
        if covered >= count:
            break
    return chosen[::-1]


def after_step(records: list[dict], step: int) -> list[dict]:
    """The records whose steps all come after ``step`` (e.g. to leave out warm-up)."""
    return [r for r in records if "iteration" in r and first_step_of(r) > step]


def step_mean(records: list[dict], key: str) -> Optional[float]:
    """Mean of ``key`` over the steps the records cover (each record weighted by its steps);
    None when no record has it."""
    pairs = [(r[key], steps_of(r)) for r in records if r.get(key) is not None]
    if not pairs:
        return None
    return sum(value * steps for value, steps in pairs) / sum(steps for _, steps in pairs)
