"""How late the event loop wakes up: the time something held it that it should not have.

Everything a worker does for its jobs, and the renewal of their leases, waits
while the loop is held. A sleeper that wakes every ``interval`` measures the
delay; a delay past ``warn_after`` is logged as it happens (``event_loop_blocked``),
and the worker logs a summary when it stops (``event_loop_lag``). It samples only
while ``active`` is set (jobs run): an idle worker should not wake ten times a second.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
from collections import deque

import structlog

log = structlog.get_logger("llm_router.worker")


class LoopLag:
    def __init__(
        self,
        interval: float = 0.1,
        warn_after: float = 0.25,
        keep: int = 10_000,
        *,
        active: asyncio.Event | None = None,
    ) -> None:
        self.interval = interval
        self.active = active
        self.warn_after = warn_after
        self.recent: deque[float] = deque(maxlen=keep)
        self.samples = 0
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> LoopLag:
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="loop lag")
        return self

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self.active is not None and not self.active.is_set():
                await self.active.wait()
            before = loop.time()
            await asyncio.sleep(self.interval)
            lag = max(0.0, loop.time() - before - self.interval)
            self.recent.append(lag)
            self.samples += 1
            self.worst = max(self.worst, lag)
            if lag > self.warn_after:
                log.warning("event_loop_blocked", lag_ms=round(lag * 1000, 1))

    def summary(self) -> dict[str, float | int]:
        """Milliseconds: median and 99th percentile of the recent samples, worst ever."""
        recent = sorted(self.recent)
        if not recent:
            return {"samples": 0}
        p99 = recent[min(len(recent) - 1, int(len(recent) * 0.99))]
        return {
            "samples": self.samples,
            "p50_ms": round(statistics.median(recent) * 1000, 2),
            "p99_ms": round(p99 * 1000, 2),
            "max_ms": round(self.worst * 1000, 2),
        }


def exempt_start_up_objects() -> None:
    """Leave what start-up made out of every later garbage collection.

    litellm leaves ~400,000 objects; a full collection scans them all, ~190 ms with
    the GIL held, whichever thread happens to trigger it (a big answer's validation).
    """
    gc.collect()
    gc.freeze()
