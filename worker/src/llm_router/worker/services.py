"""The daemon put together: Redis, the router, the loop, and what runs beside the loop.

:func:`serve` connects (waiting out a Redis that is not there yet), builds the
:class:`~llm_router.worker.router.Router`, the queue and the
:class:`~llm_router.worker.loop.Worker`, starts the :class:`Services` (warm-up,
heartbeat, Prometheus, systemd's notifications, the event-loop lag monitor, the
metrics sweep) and serves until a signal, then stops them in order. Each service is
a module of its own; this one only starts and stops them and passes the loop's
news (results stored, the stop) to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid

import structlog
from redis.asyncio import Redis

from llm_router.client.connections import redis_from_url
from llm_router.client.protocol import RouteResult
from llm_router.client.tally import Tally
from llm_router.worker.heartbeat import HeartbeatWriter, heartbeat_of
from llm_router.worker.jobs import RouteJobs
from llm_router.worker.lag import LoopLag, exempt_start_up_objects
from llm_router.worker.lanes import Lanes
from llm_router.worker.loop import Worker
from llm_router.worker.outage import RedisOutage
from llm_router.worker.prometheus import Exporter
from llm_router.worker.queue import RedisQueue
from llm_router.worker.redis_watch import RedisWatch
from llm_router.worker.router import Router
from llm_router.worker.settings import Settings
from llm_router.worker.systemd import Notifier

log = structlog.get_logger("llm_router.jobs")

#: How often a worker looks for jobs another worker stored but died before counting
#: (rare: only a worker killed in that instant leaves one).
SWEEP_EVERY_S = 15.0


class Services:
    """What runs beside the loop, started once Redis answers and stopped last."""

    def __init__(self, settings: Settings, redis: Redis, router: Router, worker: Worker) -> None:
        self.settings = settings
        self.redis = redis
        self.router = router
        self.worker = worker
        self.tally = Tally()
        self.started_at = time.time()
        self.watch = RedisWatch(redis)
        self.exporter = Exporter(settings, worker, router, redis, self.watch)
        self.systemd = Notifier()
        self.lag = LoopLag(active=worker.busy)
        self.heartbeat: HeartbeatWriter | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._batches: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[object]] = set()

    async def start(self) -> None:
        settings, router, worker = self.settings, self.router, self.worker
        router.windows.log_known(router.models)
        router.warmer.warm(router.models)
        await self.watch.refresh()
        serving_metrics = await self.exporter.start()
        port = settings.metrics_port if serving_metrics else None
        self.heartbeat = HeartbeatWriter(
            self.redis,
            worker.token,
            lambda: heartbeat_of(
                worker,
                settings,
                router,
                self.tally,
                started_at=self.started_at,
                metrics_port=port,
                server=self.watch.state,
            ),
            before=self.watch.refresh,
        )
        await self.heartbeat.beat()
        self.heartbeat.start()
        self._sweeper = asyncio.create_task(self._sweep(), name="metrics sweep")
        if router.batches is not None:
            self._batches = asyncio.create_task(router.batches.run(), name="message batches")
        self.systemd.ready(self.status())
        self.systemd.keep_alive(self.status)
        exempt_start_up_objects()
        self.lag.start()
        log.info(
            "worker_ready",
            worker_id=worker.token,
            pid=os.getpid(),
            queue=settings.queue_name,
            batch_queue=settings.batch_queue_name,
            max_jobs=settings.max_jobs,
            batch_max_jobs=settings.batch_slots,
            chains={name: [m.model for m in chain] for name, chain in settings.chains.items()},
        )

    def status(self) -> str:
        done = self.tally.total
        return f"serving {self.settings.queue_name}: {self.worker.running} running, {done} done"

    # -- what the loop tells (loop.Listener) ------------------------------------------------

    def finished(self, result: RouteResult) -> None:
        self.tally.count(result.status)
        self.exporter.observe(result)

    def parked(self) -> None:
        if self.router.batches is not None:
            self.router.batches.parked_here += 1

    def stopping(self) -> None:
        """Say so at once: health checks stop counting this worker."""
        self.systemd.stopping(f"stopping: {self.worker.running} running")
        if self.heartbeat is not None:
            task = asyncio.ensure_future(self.heartbeat.beat())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY_S)
            await self.router.metrics.sweep()

    async def stop(self) -> None:
        for task in (self._sweeper, self._batches):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.systemd.close()
        if self.heartbeat is not None:
            await self.heartbeat.stop()
        await self.exporter.stop()
        await self.router.aclose()
        self.lag.stop()
        log.info("event_loop_lag", **self.lag.summary())
        log.info("worker_stopped", worker_id=self.worker.token)


async def connect(settings: Settings) -> Redis:
    """A client of the worker's Redis (plain, TLS or Sentinel URL) that has answered."""
    redis = redis_from_url(
        settings.redis_url.get_secret_value(), socket_connect_timeout=5, health_check_interval=30
    )
    try:
        await redis.ping()
    except BaseException:
        await redis.aclose()
        raise
    return redis


def build(
    settings: Settings, redis: Redis, outage: RedisOutage | None = None
) -> tuple[Worker, Router]:
    """The loop over these settings' queues, and the router whose jobs it runs."""
    lanes = Lanes(
        settings.queue_name,
        settings.batch_queue_name,
        max_jobs=settings.max_jobs,
        batch_max_jobs=settings.batch_slots,
        keep_result_s=settings.keep_result,
        batch_keep_result_s=settings.batch_keep_result,
    )
    queue = RedisQueue(
        redis,
        lanes,
        token=uuid.uuid4().hex,
        lease_ms=int(settings.lease_seconds * 1000),
        outage=outage,
        failed_keep=settings.failed_keep,
        failed_keep_s=settings.failed_keep_seconds,
    )
    router = Router(settings, redis=redis)
    worker = Worker(
        queue,
        RouteJobs(router, settings),
        poll_delay=settings.poll_delay,
        job_timeout=settings.job_timeout,
        shutdown_grace=settings.shutdown_grace,
    )
    return worker, router


async def serve(settings: Settings) -> None:
    """Run the daemon until SIGTERM or SIGINT; Redis may come and go meanwhile."""
    outage = RedisOutage()
    redis = await outage.retry("start-up", lambda: connect(settings))
    worker, router = build(settings, redis, outage)
    services = Services(settings, redis, router, worker)
    worker.listeners.append(services)
    try:
        await services.start()
        await worker.serve()
    finally:
        await services.stop()
        with contextlib.suppress(Exception):
            await redis.aclose()
