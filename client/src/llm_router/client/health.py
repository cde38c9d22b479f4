"""``llm-router health`` and ``llm-router-worker --check``: does anyone serve this queue?

Healthy means Redis answers, is neither full nor set to evict keys, and at least one
worker whose heartbeat has not lapsed says it is ``serving`` the queue. The verdict is
one line, safe to log: it names the queue and counts workers, and never shows the
Redis URL (it may hold a password).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.exceptions import RedisError

from llm_router.client.heartbeats import Heartbeat, live_workers, serving
from llm_router.client.server import best_known, read_server

#: Longest a check waits for Redis in all, whatever the connection's own timeouts.
CHECK_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Health:
    """The verdict: ``line`` starts with ``healthy:`` or ``unhealthy:``."""

    ok: bool
    line: str
    #: The live workers serving the queue (empty when unhealthy).
    workers: list[Heartbeat] = field(default_factory=list)


def _workers(n: int) -> str:
    return f"{n} worker" if n == 1 else f"{n} workers"


def _jobs(n: int) -> str:
    return f"{n} job" if n == 1 else f"{n} jobs"


def verdict(beats: list[Heartbeat], queue: str) -> Health:
    """The verdict on the live heartbeats ``beats`` for ``queue`` (no I/O)."""
    mine = serving(beats, queue)
    if mine:
        running = sum(b.running.get(queue, 0) for b in mine)
        verb = "serves" if len(mine) == 1 else "serve"
        line = f"healthy: {_workers(len(mine))} {verb} {queue!r} ({_jobs(running)} running)"
        return Health(True, line, mine)
    stopping = sum(1 for b in beats if queue in b.queues)
    others = len(beats) - stopping
    why = []
    if stopping:
        why.append(f"{_workers(stopping)} stopping")
    if others:
        why.append(f"{_workers(others)} {'serves' if others == 1 else 'serve'} other queues")
    detail = ", ".join(why) if why else "no live workers at all"
    return Health(False, f"unhealthy: no live worker serves queue {queue!r} ({detail})")


async def check(redis: Redis, queue: str, *, timeout: float = CHECK_TIMEOUT_S) -> Health:
    """Ask Redis (PING, its state, then the heartbeats) and judge; never raises for Redis
    being away. A full Redis, or one that may evict jobs, is unhealthy whatever the
    workers do: it loses or refuses work."""
    try:
        async with asyncio.timeout(timeout):
            await redis.ping()
            state = await read_server(redis)
            beats = await live_workers(redis)
    except (RedisError, OSError, TimeoutError) as exc:
        return Health(
            False, f"unhealthy: Redis at the configured URL does not answer: {type(exc).__name__}"
        )
    problems = best_known(state, [b.redis for b in beats]).problems()
    if problems:
        return Health(False, f"unhealthy: {problems[0]}")
    return verdict(beats, queue)
