"""One row per finished run, read from its directory: the score file (today's eval results
JSON: accuracy per category and overall, in %) and whatever numbers the run's JSONL log holds,
reduced over the last steps, so new metrics become columns without a change here.

Column names: ``loss`` -> final_loss, ``stgc/<name>`` -> <name>, otherwise '/' -> '_'
(``ltdr/tail_fraction`` -> ltdr_tail_fraction); plus <modality>_load_cv (std / mean of tokens
per expert, averaged over the MoE layers; 0 = even) and <stage>_seconds.
A key a run's log does not have is a blank cell, not an error.
"""

from __future__ import annotations

import json
import os
import statistics
from typing import Any, Optional

from megatron_stgc.analysis.plots import expert_token_totals
from megatron_stgc.study.grid_file import StudyError
from megatron_stgc.study.plan import Job, Study

BOOKKEEPING = ("iteration", "consumed_samples")


def column_name(key: str) -> str:
    if key == "loss":
        return "final_loss"
    if key.startswith("stgc/"):
        key = key[len("stgc/"):]
    return key.replace("/", "_")


def read_log(path: str) -> list[dict]:
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise StudyError(f"{path}:{number}: not a JSON record ({error})") from None
    return records


def last_steps(records: list[dict], steps: int) -> list[dict]:
    """The records of the last ``steps`` training steps. A resumed run appends to its log: a
    step logged twice counts once (its newest record). Logs written once per log interval
    give the records whose iteration lies in the window."""
    if not records or any("iteration" not in r for r in records):
        return records[-steps:]
    by_step = {r["iteration"]: r for r in records}
    last = max(by_step)
    return [by_step[i] for i in sorted(by_step) if i > last - steps]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def log_metrics(records: list[dict], reduce: str) -> dict[str, float]:
    """Every numeric key of these records, reduced (mean or median) over the records that
    have it; then the load imbalance of each modality."""
    values: dict[str, list[float]] = {}
    for record in records:
        for key, value in record.items():
            if key not in BOOKKEEPING and _is_number(value):
                values.setdefault(column_name(key), []).append(float(value))
    fold = statistics.fmean if reduce == "mean" else statistics.median
    row = {key: fold(found) for key, found in values.items()}
    cvs: dict[str, list[float]] = {}
    for (_, modality), counts in expert_token_totals(records).items():
        if sum(counts) > 0:
            cvs.setdefault(modality, []).append(
                statistics.pstdev(counts) / statistics.fmean(counts))
    row.update({f"{modality}_load_cv": statistics.fmean(found) for modality, found in
                sorted(cvs.items())})
    return row


def score_columns(results: dict) -> dict[str, float]:
    """The eval results JSON -> acc_<category> and acc_overall (in %); other top-level
    numbers as score_<key>."""
    row = {}
    overall = results.get("overall")
    if isinstance(overall, dict) and "accuracy" in overall:
        for category, entry in sorted((results.get("per_category") or {}).items()):
            row[f"acc_{category}"] = 100.0 * entry["accuracy"]
        row["acc_overall"] = 100.0 * overall["accuracy"]
    for key, value in results.items():
        if _is_number(value):
            row[f"score_{key}"] = float(value)
    return row


def _read_json(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        try:
            found = json.load(f)
        except json.JSONDecodeError as error:
            raise StudyError(f"{path}: not JSON ({error})") from None
    if not isinstance(found, dict):
        raise StudyError(f"{path}: expected a JSON object of scores")
    return found


def axis_names(study: Study) -> list[str]:
    """Every axis of the study's points (their columns: blank for named points)."""
    return list(dict.fromkeys(axis for point in study.points.values() for axis in point.axes))


def run_row(study: Study, job: Job, ran_now: bool) -> dict[str, Any]:
    report = study.report
    point = study.points[job.point]
    row: dict[str, Any] = {"point": job.point, "seed": job.seed,
                           **{axis: point.axes.get(axis, "") for axis in axis_names(study)}}
    results = _read_json(os.path.join(job.directory, report["score_file"]))
    if results is not None:
        row.update(score_columns(results))
    log = os.path.join(job.directory, report["log_file"])
    if os.path.isfile(log):
        window = last_steps(read_log(log), int(report["metrics"]["last_steps"]))
        row.update(log_metrics(window, report["metrics"]["reduce"]))
    for step in job.steps:
        with open(step.marker) as f:
            row[f"{step.stage}_seconds"] = float(f.read().strip() or "nan")
    row["ran_now"] = ran_now
    return row


def collect_rows(study: Study, ran_now: set[str], say=print) -> list[dict[str, Any]]:
    """Rows of the finished runs, seed-major as planned; unfinished runs are named."""
    finished = [job for job in study.runs if job.finished()]
    missing = [job.name for job in study.runs if not job.finished()]
    if missing:
        say(f"study: collect: {len(finished)} of {len(study.runs)} runs finished; not yet: "
            + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
    return [run_row(study, job, job.name in ran_now) for job in finished]
