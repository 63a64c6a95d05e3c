"""The points of a study: axes (a flag, a launcher setting or named flag sets), their grid
(every combination), variations (one-factor changes from the axes' first values), named
points (a flag list), and which point each point is compared with (its baseline).

Grid file::

    grid:
      flags: [--stgc]                 # added to every grid point and variation
      axes:                           # in this order in the point names
        beta: {flag: --stgc-beta, values: [0.1, 1.0]}          # -> --stgc-beta 0.1
        world: {setting: nproc_per_node, values: [1, 2]}         # -> torchrun processes
        stgc: {choices: {off: [], exact: [--stgc]}, values: [off, exact]}
        estimator: {flag: --stgc-estimator, values: [exact], prefix: "", name_omits: exact}
      variations: [{beta: 1.0, tau: -0.1}]   # axes not named: their first value
      skip_invalid: false             # true: points megatron-stgc refuses are left out
    points: {baseline: [--stgc, --stgc-beta, 0]}   # or {flags: [...], nproc_per_node: 1,
                                      #     baseline: other_point}  (its own comparison)
    baseline: baseline                # a point's name, or {stgc: "off"}: per point, the
                                      # point that differs only in these axis values
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_stgc.study.grid_file import StudyError

SETTINGS = ("nproc_per_node", "nnodes")
NAME_RE = re.compile(r"^[A-Za-z0-9._+-]+$")


@dataclass
class Axis:
    name: str
    values: list[str]
    flag: Optional[str] = None
    setting: Optional[str] = None
    choices: Optional[dict[str, list[str]]] = None
    prefix: Optional[str] = None  # in point names; default: the axis name
    name_omits: Optional[str] = None  # this value adds nothing to the point name

    def flags_for(self, value: str) -> list[str]:
        if self.flag is not None:
            return [self.flag, value]
        if self.choices is not None:
            if value not in self.choices:
                raise StudyError(f"axis {self.name}: {value!r} is not one of its choices "
                                 f"({', '.join(self.choices)})")
            return list(self.choices[value])
        return []

    def name_part(self, value: str) -> str:
        if value == self.name_omits:
            return ""
        prefix = self.name if self.prefix is None else self.prefix
        return prefix + re.sub(r"[^A-Za-z0-9.+-]", "-", value.replace(",", "+"))


@dataclass
class Point:
    name: str
    flags: list[str]
    axes: dict[str, str] = field(default_factory=dict)  # {} for named points
    settings: dict[str, int] = field(default_factory=dict)  # nproc_per_node / nnodes
    baseline: Optional[str] = None  # a named point's own baseline ("none": compared with none)


def text(value: Any) -> str:
    """A YAML scalar as it goes on a command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _str_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or any(isinstance(v, (dict, list)) for v in value):
        raise StudyError(f"{where}: expected a list of flags / values, got {value!r}")
    return [text(v) for v in value]


def parse_axis(name: str, spec: Any) -> Axis:
    where = f"grid.axes.{name}"
    if not isinstance(spec, dict):
        raise StudyError(f"{where}: expected a mapping with 'values' and one of flag, setting, "
                         f"choices; got {spec!r}")
    unknown = set(spec) - {"values", "flag", "setting", "choices", "prefix", "name_omits"}
    kinds = [key for key in ("flag", "setting", "choices") if key in spec]
    if unknown or len(kinds) != 1 or "values" not in spec:
        raise StudyError(f"{where}: needs 'values' and exactly one of flag, setting, choices"
                         + (f"; unknown key(s) {', '.join(sorted(unknown))}" if unknown else ""))
    if spec.get("setting") not in (None, *SETTINGS):
        raise StudyError(f"{where}: setting must be one of {', '.join(SETTINGS)}")
    choices = spec.get("choices")
    if choices is not None:
        if not isinstance(choices, dict):
            raise StudyError(f"{where}.choices: expected {{value: [flags]}}")
        choices = {text(k): _str_list(v or [], f"{where}.choices.{k}") for k, v in choices.items()}
    values = _str_list(spec["values"], f"{where}.values")
    if not values:
        raise StudyError(f"{where}.values: empty")
    return Axis(name, values, spec.get("flag"), spec.get("setting"), choices,
                None if spec.get("prefix") is None else text(spec["prefix"]),
                None if spec.get("name_omits") is None else text(spec["name_omits"]))


def axis_point(axes: list[Axis], values: dict[str, str], grid_flags: list[str]) -> Point:
    flags, settings = list(grid_flags), {}
    for axis in axes:
        value = values[axis.name]
        flags += axis.flags_for(value)
        if axis.setting:
            if not value.isdigit() or int(value) < 1:
                raise StudyError(f"axis {axis.name}: {axis.setting} must be a positive integer, "
                                 f"got {value!r}")
            settings[axis.setting] = int(value)
    name = "_".join(filter(None, (a.name_part(values[a.name]) for a in axes))) or "grid"
    return Point(name, flags, dict(values), settings)


def parse_variations(text_spec: str) -> list[dict[str, str]]:
    """'beta=1.0,tau=-0.1;layers=2' -> [{beta: 1.0, tau: -0.1}, {layers: 2}]."""
    variations = []
    for spec in filter(None, (s.strip() for s in text_spec.split(";"))):
        items = {}
        for item in spec.split(","):
            key, sep, value = item.partition("=")
            if not sep:
                raise StudyError(f"--variations: {item!r} in {spec!r} is not AXIS=VALUE")
            items[key.strip()] = value.strip()
        variations.append(items)
    return variations


def split_values(values_text: str) -> list[str]:
    """'0.1,0.3' -> ['0.1', '0.3']; with a ';' the values are ';'-separated ('all;1,2')."""
    separator = ";" if ";" in values_text else ","
    return [v.strip() for v in values_text.split(separator) if v.strip()]


def grid_points(grid: dict, axis_values: dict[str, list[str]],
                extra_variations: list[dict[str, str]]) -> list[Point]:
    """Every combination of the axes, then the variations; ``axis_values`` replaces the
    values of the named axes (--axis)."""
    unknown = set(grid) - {"flags", "axes", "variations", "skip_invalid"}
    if unknown:
        raise StudyError(f"grid: unknown key(s) {', '.join(sorted(unknown))}; known: flags, "
                         "axes, variations, skip_invalid")
    axes = [parse_axis(name, spec) for name, spec in (grid.get("axes") or {}).items()]
    by_name = {axis.name: axis for axis in axes}
    for name, values in axis_values.items():
        if name not in by_name:
            raise StudyError(f"--axis {name}: no such axis in the grid file (axes: "
                             f"{', '.join(by_name) or 'none'})")
        by_name[name].values = values
    if not axes:
        if axis_values or extra_variations or grid.get("variations"):
            raise StudyError("grid: variations / --axis need grid.axes")
        return []
    flags = _str_list(grid.get("flags") or [], "grid.flags")
    points = [axis_point(axes, dict(zip(by_name, combo)), flags)
              for combo in itertools.product(*(axis.values for axis in axes))]
    variations = list(grid.get("variations") or []) + list(extra_variations)
    for variation in variations:
        if not isinstance(variation, dict):
            raise StudyError(f"grid.variations: expected {{axis: value}}, got {variation!r}")
        values = {axis.name: axis.values[0] for axis in axes}
        for key, value in variation.items():
            if key not in by_name:
                raise StudyError(f"variation {variation}: unknown axis {key!r}; axes: "
                                 f"{', '.join(by_name)}")
            values[key] = text(value)
        points.append(axis_point(axes, values, flags))
    return points


def named_points(spec: Any) -> list[Point]:
    if not isinstance(spec, dict):
        raise StudyError(f"points: expected {{name: [flags]}}, got {spec!r}")
    points = []
    for name, value in spec.items():
        name = text(name)
        if not NAME_RE.match(name):
            raise StudyError(f"points.{name}: a point name may hold letters, digits, . _ + - "
                             "(it names a directory)")
        if isinstance(value, dict):
            unknown = set(value) - {"flags", "baseline", *SETTINGS}
            if unknown:
                raise StudyError(f"points.{name}: unknown key(s) {', '.join(sorted(unknown))}; "
                                 f"known: flags, baseline, {', '.join(SETTINGS)}")
            settings = {key: int(value[key]) for key in SETTINGS if key in value}
            if "baseline" in value and value["baseline"] is None:
                raise StudyError(f"points.{name}.baseline: empty; name a point, or write "
                                 "none for no comparison")
            baseline = None if value.get("baseline") is None else text(value["baseline"])
            points.append(Point(name, _str_list(value.get("flags") or [], f"points.{name}"),
                                settings=settings, baseline=baseline))
        else:
            points.append(Point(name, _str_list(value or [], f"points.{name}")))
    return points


def all_points(spec: dict, axis_values: dict[str, list[str]],
               extra_variations: list[dict[str, str]]) -> dict[str, Point]:
    """{name: Point}: the named points, then the grid, then the variations (a repeat of
    an earlier point with the same flags is dropped; a clash of names is an error)."""
    points: dict[str, Point] = {}
    for point in named_points(spec.get("points") or {}) + grid_points(
            spec.get("grid") or {}, axis_values, extra_variations):
        known = points.get(point.name)
        if known is not None and (known.flags, known.settings) != (point.flags, point.settings):
            raise StudyError(f"two points are named {point.name!r} with different flags: "
                             f"{known.flags} and {point.flags}")
        points.setdefault(point.name, point)
    if not points:
        raise StudyError("the grid file defines no points (points: or grid.axes:)")
    return points


def baselines(points: dict[str, Point], spec: Any) -> dict[str, Optional[str]]:
    """{point: the point it is compared with, or None (it is a baseline / has none)}. A named
    point's own ``baseline:`` wins over the file's (``none``: it is compared with none)."""
    result = _file_baselines(points, spec)
    for name, point in points.items():
        if point.baseline is None:
            continue
        if point.baseline == "none":
            result[name] = None
        elif point.baseline not in points or point.baseline == name:
            raise StudyError(f"points.{name}.baseline: no other point named {point.baseline!r} "
                             f"(points: {', '.join(points)})")
        else:
            result[name] = point.baseline
    return result


def _file_baselines(points: dict[str, Point], spec: Any) -> dict[str, Optional[str]]:
    if spec is None:
        return {name: None for name in points}
    if isinstance(spec, str):
        if spec not in points:
            raise StudyError(f"baseline: no point named {spec!r} (points: {', '.join(points)})")
        return {name: None if name == spec else spec for name in points}
    if not isinstance(spec, dict):
        raise StudyError(f"baseline: a point name or {{axis: value}}, got {spec!r}")
    wanted = {key: text(value) for key, value in spec.items()}
    by_axes = {tuple(sorted(p.axes.items())): p.name for p in points.values() if p.axes}
    result = {}
    for name, point in points.items():
        if not point.axes or all(point.axes.get(k) == v for k, v in wanted.items()):
            result[name] = None
            continue
        unknown = set(wanted) - set(point.axes)
        if unknown:
            raise StudyError(f"baseline: unknown axis {', '.join(sorted(unknown))}")
        target = tuple(sorted({**point.axes, **wanted}.items()))
        result[name] = by_axes.get(target)
    return result


def select(points: dict[str, Point], names: list[str],
           baseline_of: dict[str, Optional[str]]) -> list[str]:
    """--points: these points and the baselines they are compared with (named)."""
    unknown = [n for n in names if n not in points]
    if unknown:
        raise StudyError(f"--points: no point named {', '.join(unknown)}; points: "
                         f"{', '.join(points)}")
    chosen = set(names) | {baseline_of[n] for n in names if baseline_of[n]}
    return [name for name in points if name in chosen]
