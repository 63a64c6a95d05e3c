"""Checking the points before anything runs: with a ``base`` config, each point's flags (+ the
flags after ``--``) must be ``megatron-stgc train`` flags, so a typo in a grid file fails in a
second, not after stage II. With ``grid.skip_invalid`` a point whose configuration
``validate_run_config`` refuses at its world size (e.g. an expert-parallel size that does not
divide the experts) is left out, and said so."""

from __future__ import annotations

import contextlib
import io
import warnings
from typing import Callable

from megatron_stgc.study.grid_file import StudyError
from megatron_stgc.study.points import Point


def _parse(base: str, point: Point, extra: list[str]):
    from megatron_stgc.config import ConfigError, build_arg_parser, parse_run_config

    argv = ["--config", base, *point.flags, *extra]
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):  # argparse's usage text: only its last line
            _, unknown = build_arg_parser().parse_known_args(argv)
            config = None if unknown else parse_run_config(argv)
    except SystemExit:
        raise StudyError(f"point {point.name}: bad flag value in {point.flags + extra}: "
                         f"{errors.getvalue().strip().splitlines()[-1]}") from None
    except ConfigError as error:
        raise StudyError(f"point {point.name}: {error}") from None
    if unknown:
        raise StudyError(f"point {point.name}: not megatron-stgc train flags: "
                         f"{' '.join(unknown)} (in {point.flags + extra})")
    return config


def check_points(points: dict[str, Point], base: str, extra: list[str], skip_invalid: bool,
                 world_size: Callable[[Point], int], say=print) -> dict[str, Point]:
    """The points that may run; raises StudyError for flags that do not parse."""
    kept = {}
    with warnings.catch_warnings():  # megatron-core's import-time notes (no TE / apex)
        warnings.simplefilter("ignore")
        for name, point in points.items():
            if _valid(point, base, extra, skip_invalid, world_size(point), say):
                kept[name] = point
    if not kept:
        raise StudyError("every point was left out as invalid (grid.skip_invalid)")
    return kept


def _valid(point: Point, base: str, extra: list[str], skip_invalid: bool, world: int,
           say) -> bool:
    from megatron_stgc.config import ConfigError
    from megatron_stgc.validation import validate_run_config

    config = _parse(base, point, extra)
    if not skip_invalid:
        return True
    try:
        validate_run_config(config, world)
    except ConfigError as error:
        say(f"study: point {point.name} left out (grid.skip_invalid): {error}")
        return False
    return True
