"""This worker's heartbeat in Redis, so health checks and ``llm-router status`` see it.

Every third of :data:`~llm_router.client.heartbeats.HEARTBEAT_TTL_S` the worker
rewrites its :class:`~llm_router.client.heartbeats.Heartbeat` (jobs running and
done, breakers as it last saw them) and renews its entry in the index. A killed
worker's heartbeat lapses with its TTL; a stopping one says so at once and removes
itself when it is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Protocol

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from llm_router.client.heartbeats import HEARTBEAT_TTL_S, Heartbeat
from llm_router.client.keys import WORKERS_KEY, heartbeat_key
from llm_router.client.server import ServerState
from llm_router.client.tally import Tally
from llm_router.worker.lanes import Lanes
from llm_router.worker.settings import Settings

if TYPE_CHECKING:
    from llm_router.worker.router import Router

log = structlog.get_logger("llm_router.heartbeat")


@functools.cache  # read once: the installed version does not change under a running worker
def package_version() -> str:
    try:
        return version("llm-router-worker")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree
        return "unknown"


class HeartbeatWriter:
    """Writes the heartbeat ``snapshot()`` builds; never raises for Redis being away."""

    def __init__(
        self,
        redis: Redis,
        worker_id: str,
        snapshot: Callable[[], Heartbeat],
        *,
        ttl_s: float = HEARTBEAT_TTL_S,
        before: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self.redis = redis
        self.worker_id = worker_id
        self.snapshot = snapshot
        self.ttl_s = ttl_s
        #: Run before each beat, for what the heartbeat reports (a look at the server).
        self.before = before
        self._task: asyncio.Task[None] | None = None

    def start(self) -> HeartbeatWriter:
        self._task = asyncio.create_task(self._run(), name="heartbeat")
        return self

    async def beat(self) -> bool:
        beat = self.snapshot()
        now_ms = int(time.time() * 1000)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(
                    heartbeat_key(self.worker_id), beat.model_dump_json(), px=int(self.ttl_s * 1000)
                )
                pipe.zadd(WORKERS_KEY, {self.worker_id: now_ms + int(self.ttl_s * 1000)})
                pipe.zremrangebyscore(WORKERS_KEY, "-inf", now_ms)
                await pipe.execute()
        except (RedisError, OSError):
            return False  # the queue loop reports outages; the next beat tries again
        return True

    async def _run(self) -> None:
        while True:
            if self.before is not None:
                await self.before()
            await self.beat()
            await asyncio.sleep(self.ttl_s / 3)

    async def stop(self) -> None:
        """Gone: the heartbeat and the index entry go at once, not at the TTL."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(RedisError, OSError):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.delete(heartbeat_key(self.worker_id))
                pipe.zrem(WORKERS_KEY, self.worker_id)
                await pipe.execute()


class Serving(Protocol):
    """What the heartbeat reads off the daemon."""

    token: str
    lanes: Lanes
    stopping: bool


def heartbeat_of(
    worker: Serving,
    settings: Settings,
    router: Router,
    tally: Tally,
    *,
    started_at: float,
    metrics_port: int | None = None,
    server: ServerState | None = None,
) -> Heartbeat:
    return Heartbeat(
        worker_id=worker.token,
        host=socket.gethostname(),
        pid=os.getpid(),
        version=package_version(),
        state="stopping" if worker.stopping else "serving",
        started_at=started_at,
        at=time.time(),
        queues=worker.lanes.names,
        max_jobs=settings.max_jobs,
        batch_max_jobs=settings.batch_slots,
        running={q.name: q.running for q in worker.lanes.queues},
        done=dict(tally.by_status),
        last_job_at=tally.last_at,
        breakers={m.label: router.breakers.seen.get(m.label, "closed") for m in router.models},
        chains={name: [m.model for m in chain] for name, chain in settings.chains.items()},
        metrics_port=metrics_port,
        redis=server.as_dict() if server is not None else None,
        batches=router.batches.tally() if router.batches is not None else None,
    )
