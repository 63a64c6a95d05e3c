"""Configuration errors, reported all at once.

A check calls ``require(condition, message)``. Outside ``collect_problems`` a failed
requirement raises ``ConfigError`` at once; inside it the message is recorded and the
check goes on, so ``megatron-stgc validate`` (and every command) lists every problem of a
config in one run. A check that raises ``ConfigError`` itself ends early with its message
recorded. An exception a check raises after problems were recorded (a zero size that a
later division meets, say) is taken as a consequence of them and ends that check; with no
problem recorded before it, it propagates (a bug, not a config problem).
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Callable, Iterable, Optional


class ConfigError(ValueError):
    """One or more configuration problems, found before any process group is created;
    each message names the flag (or file) it is about. ``problems``: the messages."""

    def __init__(self, *problems: str):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


_COLLECTED: ContextVar[Optional[list[str]]] = ContextVar("config_problems", default=None)


def require(condition: bool, message: str) -> None:
    """Record (inside ``collect_problems``) or raise ``message`` unless ``condition``."""
    if condition:
        return
    collected = _COLLECTED.get()
    if collected is None:
        raise ConfigError(message)
    collected.append(message)


def collect_problems(checks: Iterable[Callable[[], None]]) -> list[str]:
    """Run every check; the problems they found, in order, each once."""
    problems: list[str] = []
    token = _COLLECTED.set(problems)
    try:
        for check in checks:
            try:
                check()
            except ConfigError as error:
                problems.extend(error.problems)
            except (ArithmeticError, TypeError, ValueError, AssertionError, KeyError):
                if not problems:
                    raise
    finally:
        _COLLECTED.reset(token)
    return list(dict.fromkeys(problems))


def check(function: Callable[..., None], *args) -> None:
    """Run one group of checks; inside ``collect_problems`` a ConfigError it raises is
    recorded and the caller's checks go on."""
    collected = _COLLECTED.get()
    if collected is None:
        function(*args)
        return
    try:
        function(*args)
    except ConfigError as error:
        collected.extend(error.problems)


def raise_problems(problems: list[str]) -> None:
    """ConfigError carrying ``problems`` (nothing when there are none)."""
    if problems:
        raise ConfigError(*problems)
