"""What runs beside the queue loop: started once Redis answers, stopped last.

The router and its warm-up, the event-loop lag monitor, the heartbeat, Prometheus,
systemd's notifications — each its own module; this one only starts and stops them
in order and hands them the worker's hooks (results stored, SIGTERM received).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import structlog

from llm_router.worker.heartbeat import HeartbeatWriter, Tally, heartbeat_of
from llm_router.worker.lag import LoopLag, exempt_start_up_objects
from llm_router.worker.prometheus import Exporter
from llm_router.worker.router import Router
from llm_router.worker.settings import Settings
from llm_router.worker.systemd import Notifier

log = structlog.get_logger("llm_router.jobs")


async def start(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    worker = ctx["worker"]
    router = ctx["router"] = Router(settings, redis=ctx["redis"])
    router.windows.log_known(router.models)
    router.warmer.warm(router.models)
    tally = Tally()
    worker.observers.append(tally.observe)
    started_at = time.time()
    exporter = ctx["exporter"] = Exporter(settings, worker, router, ctx["redis"])
    worker.observers.append(exporter.observe)
    serving_metrics = await exporter.start()
    port = settings.metrics_port if serving_metrics else None
    heartbeat = ctx["heartbeat"] = HeartbeatWriter(
        ctx["redis"],
        worker.token,
        lambda: heartbeat_of(
            worker, settings, router, tally, started_at=started_at, metrics_port=port
        ),
    )
    await heartbeat.beat()
    heartbeat.start()
    background: set[asyncio.Task[Any]] = set()

    systemd = ctx["systemd"] = Notifier()

    def status() -> str:
        running = sum(q.running for q in worker.lanes.queues)
        return f"serving {settings.queue_name}: {running} running, {sum(tally.done.values())} done"

    def stopping() -> None:  # say so at once: health checks stop counting this worker
        systemd.stopping(f"stopping: {sum(q.running for q in worker.lanes.queues)} running")
        task = asyncio.ensure_future(heartbeat.beat())
        background.add(task)
        task.add_done_callback(background.discard)

    worker.on_stopping.append(stopping)
    systemd.ready(status())
    systemd.keep_alive(status)
    exempt_start_up_objects()
    ctx["loop_lag"] = LoopLag().start()
    log.info(
        "worker_ready",
        worker_id=ctx.get("worker_id"),
        pid=os.getpid(),
        queue=settings.queue_name,
        batch_queue=settings.batch_queue_name,
        max_jobs=settings.max_jobs,
        batch_max_jobs=settings.batch_slots,
        chains={name: [m.model for m in chain] for name, chain in settings.chains.items()},
    )


async def stop(ctx: dict[str, Any]) -> None:
    systemd: Notifier | None = ctx.get("systemd")
    if systemd is not None:
        await systemd.close()
    heartbeat: HeartbeatWriter | None = ctx.get("heartbeat")
    if heartbeat is not None:
        await heartbeat.stop()
    exporter: Exporter | None = ctx.get("exporter")
    if exporter is not None:
        await exporter.stop()
    router: Router | None = ctx.get("router")
    if router is not None:
        await router.aclose()
    lag: LoopLag | None = ctx.get("loop_lag")
    if lag is not None:
        lag.stop()
        log.info("event_loop_lag", **lag.summary())
    log.info("worker_stopped", worker_id=ctx.get("worker_id"))
