"""One thread for CPU-heavy checks, so the event loop keeps serving while they run.

Validating a large schema or answer is pure Python: on the event loop it would
delay every other job of the worker and the renewal of their leases. In this
thread it takes the GIL in turns with the loop (every few milliseconds). One
thread, not many: hostile checks queue behind each other instead of crowding
the loop out of the GIL.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class Offload:
    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm-router-checks")

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
