"""Living through Redis outages: one log line each way, backoff in between."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from redis.exceptions import RedisError

from llm_router.client.backoff import Backoff
from llm_router.client.server import refused_for_memory

log = structlog.get_logger("llm_router.worker")

T = TypeVar("T")


class RedisOutage:
    """Shared by everything a worker does with Redis, so an outage is one log line
    when Redis goes away and one when it is back, whatever was running.

    A full Redis is its own streak: it still answers reads (lease renewals, polls), so
    only a write that gets through (a stored result) ends it.
    """

    def __init__(self) -> None:
        self.backoff = Backoff(0.2, 5.0)
        self.since = 0.0
        self.full_backoff = Backoff(0.2, 5.0)
        self.full_since = 0.0

    @property
    def failures(self) -> int:
        return self.backoff.failures

    @property
    def full(self) -> bool:
        return self.full_backoff.failures > 0

    def failed(self, exc: BaseException, during: str) -> float:
        """Note a failed call; return how long to wait before the next try."""
        if refused_for_memory(exc):
            if not self.full:
                self.full_since = time.monotonic()
                log.warning("redis_full", during=during, error=f"{type(exc).__name__}: {exc}")
            return self.full_backoff.next()
        if self.failures == 0:
            self.since = time.monotonic()
            log.warning("redis_unavailable", during=during, error=f"{type(exc).__name__}: {exc}")
        return self.backoff.next()

    def ok(self) -> None:
        """Redis answered."""
        if self.failures:
            down_s = round(time.monotonic() - self.since, 1)
            log.info("redis_back", down_s=down_s, failed_calls=self.failures)
        self.backoff.reset()

    def wrote(self) -> None:
        """Redis took a write that a full Redis refuses: there is room again."""
        self.ok()
        if self.full:
            full_s = round(time.monotonic() - self.full_since, 1)
            log.info("redis_room_again", full_s=full_s, refused_writes=self.full_backoff.failures)
        self.full_backoff.reset()

    async def retry(
        self, during: str, call: Callable[[], Awaitable[T]], *, give_up_after: float | None = None
    ) -> T:
        """Retry ``call``, a write, through an outage or a full Redis, with backoff, until
        it succeeds."""
        deadline = None if give_up_after is None else time.monotonic() + give_up_after
        while True:
            try:
                value = await call()
            except (RedisError, OSError) as exc:
                if deadline is not None and time.monotonic() > deadline:
                    raise
                await asyncio.sleep(self.failed(exc, during))
            else:
                self.wrote()
                return value
