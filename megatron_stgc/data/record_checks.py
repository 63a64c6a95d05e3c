"""Checks of untrusted record content, applied once where records enter (the LLaVA index).

LLaVA-format mixes are downloaded and merged from many sources; every string in a record is
validated before anything downstream (tokenizer training and fingerprinting, tokenization,
logging, answer files) sees it, and every image path is resolved against the image root:

* ``invalid_unicode``    a string that cannot be encoded as UTF-8: a lone UTF-16 surrogate,
                         which a valid JSON escape (``"\\udcff"``) decodes to;
* ``nul_character``      U+0000 in a string (C libraries and file systems stop there);
* ``text_too_long``      a string over ``MAX_STRING_CHARS`` characters, more than
                         ``MAX_TURNS`` turns, or nesting deeper than ``MAX_DEPTH``;
* ``record_too_large``   a record over ``MAX_RECORD_BYTES`` bytes (never parsed);
* ``image_outside_root`` an image path that leaves the image root once resolved (absolute,
                         ``..``, or a symbolic link pointing outside), unless the run opts in
                         with ``--allow-image-outside-root``.
Record ids shown in reports go through ``safe_label`` (escaped, shortened).
"""

from __future__ import annotations

import os
from typing import Optional

INVALID_UNICODE = "invalid_unicode"
NUL_CHARACTER = "nul_character"
TEXT_TOO_LONG = "text_too_long"
RECORD_TOO_LARGE = "record_too_large"
IMAGE_OUTSIDE_ROOT = "image_outside_root"

MAX_STRING_CHARS = 200_000  # one turn of a LLaVA mix is a few thousand characters
MAX_TURNS = 1_000
MAX_DEPTH = 32
MAX_RECORD_BYTES = 16 << 20
_LABEL_CHARS = 80


def safe_label(value: object) -> str:
    """A record id fit for a log line: valid UTF-8, no control characters, short."""
    text = value if isinstance(value, str) else repr(value)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return text if len(text) <= _LABEL_CHARS else text[:_LABEL_CHARS - 3] + "..."


def _string_problem(text: str) -> Optional[str]:
    if len(text) > MAX_STRING_CHARS:
        return TEXT_TOO_LONG
    if "\x00" in text:
        return NUL_CHARACTER
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return INVALID_UNICODE
    return None


def text_problem(value: object, depth: int = 0) -> Optional[str]:
    """The first problem with any string (key or value) anywhere in a parsed record, or None."""
    if depth > MAX_DEPTH:
        return TEXT_TOO_LONG
    if isinstance(value, str):
        return _string_problem(value)
    if isinstance(value, dict):
        for key, item in value.items():
            problem = _string_problem(key) or text_problem(item, depth + 1)
            if problem:
                return problem
    elif isinstance(value, list):
        if len(value) > MAX_TURNS:
            return TEXT_TOO_LONG
        for item in value:
            problem = text_problem(item, depth + 1)
            if problem:
                return problem
    return None


class ImagePathRefused(ValueError):
    """An image path that resolves outside the image root."""

    kind = IMAGE_OUTSIDE_ROOT


def resolve_image_path(image: str, image_root: Optional[str], allow_outside: bool = False) -> str:
    """The real path of a record's image, which must lie inside ``image_root``.

    ``image_root`` None: relative paths are taken from the working directory, which is then
    the root they must stay in. ``..``, absolute paths and symbolic links are resolved
    first (``os.path.realpath``), so none of them can lead outside unnoticed.
    """
    root = os.path.realpath(image_root if image_root is not None else os.getcwd())
    try:
        path = os.path.realpath(os.path.join(root, image))
    except ValueError as error:  # e.g. an embedded NUL (records are checked before this)
        raise ImagePathRefused(f"unusable image path {safe_label(image)}: {error}") from None
    if not allow_outside and os.path.commonpath([root, path]) != root:
        raise ImagePathRefused(f"image {safe_label(image)} resolves to {safe_label(path)}, "
                               f"outside the image root {safe_label(root)} "
                               "(--allow-image-outside-root to permit)")
    return path
