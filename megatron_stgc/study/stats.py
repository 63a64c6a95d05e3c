"""Per point: mean and standard deviation over seeds of every numeric column, and for the
compared columns the seed-paired difference (or ratio) to the point's baseline with a 95%
Student-t interval (n - 1 degrees of freedom; no interval from one pair)."""

from __future__ import annotations

import fnmatch
import functools
import math
import statistics
from typing import Any, Optional

NOT_METRICS = ("seed",)


@functools.lru_cache(maxsize=None)
def t_quantile(probability: float, dof: int) -> float:
    """The Student-t quantile: bisection on the CDF, the density integrated by Simpson's rule
    (no scipy needed; tests/test_study_tool.py checks it against tabulated values)."""
    log_norm = (math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2)
                - 0.5 * math.log(dof * math.pi))

    def density(x: float) -> float:
        return math.exp(log_norm - (dof + 1) / 2 * math.log1p(x * x / dof))

    def cdf(x: float, intervals: int = 4000) -> float:
        h = x / intervals
        total = density(0.0) + density(x) + sum(
            (4 if i % 2 else 2) * density(i * h) for i in range(1, intervals))
        return 0.5 + total * h / 3

    low, high = 0.0, 1000.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) < probability else (low, middle)
    return (low + high) / 2


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) of a 95% Student-t interval; (mean, nan, nan) for one value."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = t_quantile(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and not math.isnan(value)


def metric_columns(rows: list[dict]) -> list[str]:
    columns = dict.fromkeys(key for row in rows for key in row)
    return [key for key in columns if key not in NOT_METRICS
            and any(_number(row.get(key)) for row in rows)]


def compared(columns: list[str], compare: dict[str, str]) -> dict[str, str]:
    """{column: 'difference' | 'ratio'} for the columns the compare patterns match."""
    result = {}
    for pattern, kind in compare.items():
        for column in columns:
            if fnmatch.fnmatchcase(column, pattern):
                result.setdefault(column, kind)
    return result


def paired(runs: dict[int, dict], base: dict[int, dict], column: str, kind: str) -> list[float]:
    values = []
    for seed, row in runs.items():
        other = base.get(seed, {}).get(column)
        if _number(row.get(column)) and _number(other):
            if kind == "difference":
                values.append(row[column] - other)
            elif other != 0:
                values.append(row[column] / other)
    return values


def summarise(rows: list[dict], points: list[str], axes: dict[str, dict],
              baseline_of: dict[str, Optional[str]], compare: dict[str, str]) -> list[dict]:
    columns = metric_columns(rows)
    kinds = compared(columns, compare)
    by_point = {p: {r["seed"]: r for r in rows if r["point"] == p} for p in points}
    summary = []
    for point in points:
        runs = by_point[point]
        if not runs:
            continue
        line: dict[str, Any] = {"point": point, "seeds": len(runs), **axes.get(point, {}),
                                "baseline": baseline_of.get(point) or ""}
        for column in columns:
            values = [r[column] for r in runs.values() if _number(r.get(column))]
            line[f"{column}_mean"] = statistics.fmean(values) if values else None
            line[f"{column}_std"] = statistics.stdev(values) if len(values) > 1 else None
        base = by_point.get(baseline_of.get(point) or "", {})
        for column, kind in kinds.items():
            suffix = "diff" if kind == "difference" else "ratio"
            values = paired(runs, base, column, kind) if base else []
            mean, low, high = t_interval(values) if values else (None, None, None)
            line[f"{column}_{suffix}"], line[f"{column}_{suffix}_low"], \
                line[f"{column}_{suffix}_high"] = mean, low, high
            line[f"{column}_{suffix}_pairs"] = len(values)
        summary.append(line)
    return summary
