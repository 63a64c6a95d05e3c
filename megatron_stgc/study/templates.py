"""Placeholders in stage commands: ``{name}`` takes a variable's value.

A variable holds a string or a list of strings (its items may hold placeholders too). A token
that is exactly ``{name}`` of a list variable becomes the list's items (flags spliced into the
command); inside a longer token only string variables are allowed. In ``shell:`` commands
every value is shell-quoted. ``{{`` and ``}}`` are literal braces.
"""

from __future__ import annotations

import re
import shlex
from typing import Union

from megatron_stgc.study.grid_file import StudyError
from megatron_stgc.study.points import text

Value = Union[str, list]
PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")
WHOLE = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
MAX_DEPTH = 20


class Templates:
    def __init__(self, variables: dict[str, Value], where: str):
        self.variables = variables
        self.where = where  # names the stage / run in errors

    def _lookup(self, name: str) -> Value:
        if name not in self.variables:
            raise StudyError(f"{self.where}: unknown placeholder {{{name}}}; known: "
                             f"{', '.join(sorted(self.variables))}")
        return self.variables[name]

    def tokens(self, template: Union[str, list], depth: int = 0) -> list[str]:
        """A command (a list of tokens, or a string split like a shell would) -> argv."""
        if depth > MAX_DEPTH:
            raise StudyError(f"{self.where}: placeholders nest more than {MAX_DEPTH} deep "
                             "(a variable refers to itself?)")
        items = shlex.split(template) if isinstance(template, str) else template
        argv: list[str] = []
        for item in items:
            if isinstance(item, (dict, list)):
                raise StudyError(f"{self.where}: a command holds strings, got {item!r}")
            item = text(item)
            whole = WHOLE.match(item)
            if whole and isinstance(self._lookup(whole.group(1)), list):
                argv += self.tokens(self._lookup(whole.group(1)), depth + 1)
            else:
                argv.append(self.string(item, depth + 1))
        return argv

    def string(self, template: str, depth: int = 0) -> str:
        """A template with string variables only -> its text."""
        if depth > MAX_DEPTH:
            raise StudyError(f"{self.where}: placeholders nest more than {MAX_DEPTH} deep "
                             "(a variable refers to itself?)")

        def value(match: re.Match) -> str:
            if match.group(0) in ("{{", "}}"):
                return match.group(0)[0]
            found = self._lookup(match.group(1))
            if isinstance(found, list):
                raise StudyError(f"{self.where}: {{{match.group(1)}}} is a list; use it as a "
                                 f"whole token, not inside {template!r}")
            return self.string(found, depth + 1)

        return PLACEHOLDER.sub(value, str(template))

    def shell(self, template: str) -> str:
        """A ``shell:`` command: placeholders become shell-quoted words."""

        def value(match: re.Match) -> str:
            if match.group(0) in ("{{", "}}"):
                return match.group(0)[0]
            found = self._lookup(match.group(1))
            if isinstance(found, list):
                return shlex.join(self.tokens(found, 1))
            return shlex.quote(self.string(found, 1))

        return PLACEHOLDER.sub(value, template)
