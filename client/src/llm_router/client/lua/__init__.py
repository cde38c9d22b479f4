"""Redis scripts shipped as ``.lua`` files: the client's in this package, the worker's in
``llm_router.worker.lua``, each read through :func:`reader`.

Each file's header says what it does, its KEYS and ARGV in order, and what it returns,
so that a producer in another language can run the client's with ``EVALSHA``/``EVAL``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from importlib.resources import files


def reader(package: str) -> Callable[[str], str]:
    """``script(name)`` for the ``.lua`` files of ``package``, each read once."""

    @cache
    def script(name: str) -> str:
        return files(package).joinpath(name).read_text(encoding="utf-8")

    return script


#: The text of one of this package's scripts (e.g. ``"enqueue.lua"``).
script = reader(__name__)
