"""The worker's Redis scripts, shipped as ``.lua`` files in this package.

Each file's header says what it does, its KEYS and ARGV in order, and what it returns.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files


@cache
def script(name: str) -> str:
    """The text of the script ``name`` (e.g. ``"claim.lua"``) of this package."""
    return files(__name__).joinpath(name).read_text(encoding="utf-8")
