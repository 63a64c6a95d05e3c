"""The help text of each config field, read from where the field is documented, and the
"did you mean" hint for a misspelt flag or YAML key.

One source of truth: the comments beside (or directly above) a field in its dataclass,
or, for classes that document their fields in the docstring (STGCConfig, LTDRConfig), the
docstring's ``name: text`` entry. ``megatron-stgc train --help`` shows that text; a field
with none is a test failure (tests/test_cli_help.py), not an empty help line.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import io
import re
import textwrap
import tokenize
from typing import Callable, Iterable

_FIELD_LINE = re.compile(r"^\s*(\w+)\s*:")
_DOC_ENTRY = re.compile(r"^(\w+):\s+(.*)$")


@functools.lru_cache(maxsize=None)
def field_help(cls: type) -> dict[str, str]:
    """{field name: one-paragraph help} for a dataclass (empty text when undocumented)."""
    names = {f.name for f in dataclasses.fields(cls)}
    helps = _docstring_entries(cls, names)
    for name, text in _comment_entries(cls).items():
        if name in names and text:
            helps[name] = text
    return {name: helps.get(name, "") for name in names}


def _comment_entries(cls: type) -> dict[str, str]:
    """Field -> its comment: the full-line comments right above it, then the trailing one."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source shipped: docstrings only
        return {}
    comments: dict[int, tuple[str, bool]] = {}  # line -> (text, whole line)
    lines = source.splitlines()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            row, col = token.start
            whole = not lines[row - 1][:col].strip()
            comments[row] = (token.string.lstrip("#").strip(), whole)
    entries: dict[str, str] = {}
    for row, line in enumerate(lines, start=1):
        match = _FIELD_LINE.match(line)
        if match is None or line.strip().startswith(("#", "def ", "class ")):
            continue
        above, previous = [], row - 1
        while previous in comments and comments[previous][1]:
            above.insert(0, comments[previous][0])
            previous -= 1
        trailing = comments.get(row)
        parts = above + ([trailing[0]] if trailing and not trailing[1] else [])
        entries.setdefault(match.group(1), " ".join(p for p in parts if p))
    return entries


def _docstring_entries(cls: type, names: set[str]) -> dict[str, str]:
    """``name: text`` entries of the class docstring, continuation lines joined."""
    doc = inspect.getdoc(cls) or ""
    entries: dict[str, str] = {}
    current = None
    for line in doc.splitlines():
        match = _DOC_ENTRY.match(line.strip())
        if match and match.group(1) in names and not line.startswith(" "):
            current = match.group(1)
            entries[current] = match.group(2).strip()
        elif current is not None and line.startswith(" ") and line.strip():
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def did_you_mean(word: str, known: Iterable[str], show: Callable[[str], str] = str) -> str:
    """' (did you mean X or Y?)' for the closest of ``known`` to ``word``, else ''."""
    close = difflib.get_close_matches(word, list(known), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(show(c) for c in close)}?)" if close else ""
