"""Strict reading of the text files a user hands in: configs, class lists, prompt and image lists, JSON
(checkpoint configs, shard indexes, adapter configs, named λ).

- :func:`read_utf8`: the file's text, UTF-8 only (a leading byte-order mark is dropped); anything else is one
  ``ValueError`` line naming the file, the first offending byte and its offset, never a traceback from a
  decoder deep inside a parser.
- :func:`text_lines`: its lines, with universal newlines as ``open`` reads them (``\\n``, ``\\r\\n``, ``\\r``).
- :func:`visible`: whether a text holds a character a reader can see: not whitespace and not a format
  character (Unicode category ``Cf``: zero-width spaces and joiners, direction marks, soft hyphens, BOMs).
- :func:`read_json_object`: a JSON object (a ``dict``), refused in one line when the file is not UTF-8, not
  JSON, not an object, or repeats a key anywhere in it (JSON readers keep the last value silently).
"""
from __future__ import annotations

import io
import json
import os
import unicodedata
from pathlib import Path
from typing import Any


def read_utf8(path: str | os.PathLike) -> str:
    """The text of the file ``path``; ValueError naming the file, byte and offset when it is not UTF-8."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{os.fspath(path)}: not UTF-8 text: byte 0x{data[error.start]:02x} at byte offset "
                         f"{error.start} ({error.reason}); save the file as UTF-8") from None
    return text.removeprefix("\ufeff")


def text_lines(path: str | os.PathLike) -> list[str]:
    """The lines of the UTF-8 file ``path`` (`read_utf8`), line ends removed."""
    return [line.rstrip("\n") for line in io.StringIO(read_utf8(path), newline=None)]


def visible(text: str) -> bool:
    """True when ``text`` holds a character that is neither whitespace nor a format character (``Cf``)."""
    return any(not char.isspace() and unicodedata.category(char) != "Cf" for char in text)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if repeated := sorted({key for key in keys if keys.count(key) > 1}):
        raise ValueError(f"key(s) {repeated} given more than once in one object")
    return dict(pairs)


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in the file ``path``; one-line ValueError naming the file when it is not UTF-8, not
    JSON, not an object, or an object in it repeats a key."""
    name = os.fspath(path)
    text = read_utf8(name)
    try:
        document = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as error:
        raise ValueError(f"{name}: not valid JSON: {error}") from None
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None
    if not isinstance(document, dict):
        raise ValueError(f"{name}: expected a JSON object {{...}}, got {type(document).__name__}")
    return document
