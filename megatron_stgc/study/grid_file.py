"""Reading a study's grid file: YAML, ``extends`` (a parent file deep-merged under this one),
paths made absolute, unknown keys refused with the file named."""

from __future__ import annotations

import os
from typing import Any

import yaml

KEYS = ("extends", "description", "base", "workdir", "nnodes", "nproc_per_node",
        "max_restarts", "seeds", "vars", "env", "grid", "points", "baseline", "stages",
        "score_file", "log_file", "metrics", "compare", "summary_columns", "plot", "slurm")
PATH_KEYS = ("base", "workdir")  # relative to the file that names them


class StudyError(Exception):
    """A bad grid file, flag or run directory; the message names the file / flag / run."""


def load_grid_file(path: str, _chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """The grid file at ``path`` with its ``extends`` chain merged in (this file wins;
    a key set to null in this file removes the parent's)."""
    path = os.path.abspath(path)
    if path in _chain:
        raise StudyError(f"{path}: 'extends' loops back to itself ({' -> '.join(_chain)})")
    raw = _read(path)
    for key in PATH_KEYS:
        if isinstance(raw.get(key), str):
            raw[key] = os.path.normpath(os.path.join(os.path.dirname(path), raw[key]))
    parent = raw.pop("extends", None)
    if parent is None:
        return _drop_nulls(raw)
    if not isinstance(parent, str):
        raise StudyError(f"{path}: 'extends' must be a path, got {parent!r}")
    parent_path = os.path.join(os.path.dirname(path), parent)
    return _drop_nulls(deep_merge(load_grid_file(parent_path, _chain + (path,)), raw))


def _read(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise StudyError(f"--grid: file not found: {path}")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as error:
            raise StudyError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: a grid file holds a mapping (keys: {', '.join(KEYS)})")
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise StudyError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(KEYS)}")
    return raw


def deep_merge(parent: Any, child: Any) -> Any:
    """Mappings merge key by key (recursively); anything else in ``child`` replaces."""
    if not (isinstance(parent, dict) and isinstance(child, dict)):
        return child
    merged = dict(parent)
    for key, value in child.items():
        merged[key] = deep_merge(parent[key], value) if key in parent else value
    return merged


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _drop_nulls(item) for key, item in value.items() if item is not None}
    return value
