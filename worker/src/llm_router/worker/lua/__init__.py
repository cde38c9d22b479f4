"""The worker's Redis scripts, shipped as ``.lua`` files in this package.

Each file's header says what it does, its KEYS and ARGV in order, and what it returns.
"""

from __future__ import annotations

from llm_router.client.lua import reader

#: The text of one of this package's scripts (e.g. ``"claim.lua"``).
script = reader(__name__)
