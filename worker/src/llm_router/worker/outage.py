"""Living through Redis outages: one log line each way, backoff in between."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from redis.exceptions import RedisError

from llm_router.client.backoff import Backoff

log = structlog.get_logger("llm_router.worker")

T = TypeVar("T")


class RedisOutage:
    """Shared by everything a worker does with Redis, so an outage is one log line
    when Redis goes away and one when it is back, whatever was running."""

    def __init__(self) -> None:
        self.backoff = Backoff(0.2, 5.0)
        self.since = 0.0

    @property
    def failures(self) -> int:
        return self.backoff.failures

    def failed(self, exc: BaseException, during: str) -> float:
        """Note a failed call; return how long to wait before the next try."""
        if self.failures == 0:
            self.since = time.monotonic()
            log.warning("redis_unavailable", during=during, error=f"{type(exc).__name__}: {exc}")
        return self.backoff.next()

    def ok(self) -> None:
        if self.failures:
            down_s = round(time.monotonic() - self.since, 1)
            log.info("redis_back", down_s=down_s, failed_calls=self.failures)
        self.backoff.reset()

    async def retry(
        self, during: str, call: Callable[[], Awaitable[T]], *, give_up_after: float | None = None
    ) -> T:
        """Retry ``call`` through an outage, with backoff, until it succeeds."""
        deadline = None if give_up_after is None else time.monotonic() + give_up_after
        while True:
            try:
                value = await call()
            except (RedisError, OSError) as exc:
                if deadline is not None and time.monotonic() > deadline:
                    raise
                await asyncio.sleep(self.failed(exc, during))
            else:
                self.ok()
                return value
