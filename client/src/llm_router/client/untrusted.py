"""Bounds on untrusted JSON values, checked without recursion.

Python's JSON encoder, pydantic's serializer (about 255 levels) and jsonschema
all recurse, so a value nested deeply enough crashes whatever touches it next;
and a lone UTF-16 surrogate (``"\\ud800"`` is legal JSON) is not Unicode text:
it cannot be encoded as UTF-8 for a model, a log line or Redis (nor can
Python's ``NaN``, which its JSON parser accepts, be read elsewhere). Requests and
answers are looked at here first, in one pass that costs no more than the
value's size.
"""

from __future__ import annotations

import json
import math
from typing import Any


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads(text: str | bytes) -> Any:
    """``json.loads`` without Python's extensions: NaN and Infinity are refused."""
    return json.loads(text, parse_constant=_no_constants)


# Python writes and reads integers of up to 4,300 digits (sys.int_info.default_max_str_digits).
_INT_BITS_MAX = 14_000


def _not_unicode(text: str) -> bool:
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def problem(value: Any, max_depth: int, setting: str = "") -> str | None:
    """Why ``value`` is unsafe to carry, or None: nested too deeply (``setting`` names
    the limit in the message), or text that is not Unicode (in a string or a key)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if _not_unicode(item):
                return f"contains a lone UTF-16 surrogate, which is not text: {_surrogate(item)}"
            continue
        if isinstance(item, float) and not math.isfinite(item):
            return "contains NaN or Infinity, which are not JSON numbers"
        if isinstance(item, int) and item.bit_length() > _INT_BITS_MAX:
            return "contains an integer too long to write as JSON (over 4,300 digits)"
        if not isinstance(item, dict | list):
            continue
        if depth + 1 > max_depth:
            return f"is nested more than {max_depth} levels deep" + (
                f" ({setting})" if setting else ""
            )
        if isinstance(item, dict):
            stack.extend((key, depth) for key in item)
            stack.extend((child, depth + 1) for child in item.values())
        else:
            stack.extend((child, depth + 1) for child in item)
    return None


def _surrogate(text: str) -> str:
    for char in text:
        if 0xD800 <= ord(char) <= 0xDFFF:
            return f"\\u{ord(char):04x}"
    return "?"  # pragma: no cover - only called for text that has one
