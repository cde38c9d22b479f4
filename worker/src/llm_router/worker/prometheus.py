"""``/metrics`` for Prometheus: this process's jobs and calls, and the shared totals.

Two kinds of series, named apart so that a dashboard adds the right ones:

* per process (``llm_router_jobs_total``, ``llm_router_attempts_total``, latencies,
  tokens, cost, jobs in flight, breakers as this worker saw them): ``sum`` them
  over workers;
* shared, read from Redis every few seconds (``llm_router_queue_depth``,
  ``llm_router_live_workers``, ``llm_router_shared_*``, spend and budget today):
  every worker reports the same value, so take ``max``, never ``sum``.

The HTTP server is prometheus-client's, on its own thread; scraping it reads
values this module keeps, never Redis, so a scrape cannot stall the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.asyncio import Redis
from redis.exceptions import RedisError

from llm_router.client.cache import parse_stats
from llm_router.client.counters import parse_counters
from llm_router.client.keys import (
    CACHE_STATS_KEY,
    METRICS_COUNTERS_KEY,
    PARKED_SCORE_MS,
    WORKERS_KEY,
    MsgBatchKeys,
    spend_key,
)
from llm_router.client.protocol import RouteResult
from llm_router.client.spend import parse_day, utc_day
from llm_router.worker.heartbeat import Serving
from llm_router.worker.redis_watch import RedisWatch
from llm_router.worker.settings import Settings, server_of

if TYPE_CHECKING:
    from llm_router.worker.router import Router

log = structlog.get_logger("llm_router.prometheus")

#: How often the shared values are read from Redis.
REFRESH_S = 5.0
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)
_BREAKER_STATES = ("closed", "half_open", "open")


class _Live(Collector):
    """Values read at scrape time: in flight, breakers, and the cached shared ones."""

    def __init__(self, exporter: Exporter) -> None:
        self.exporter = exporter

    def collect(self) -> Iterable[Metric]:
        e = self.exporter
        running = GaugeMetricFamily(
            "llm_router_jobs_in_flight", "Jobs this process runs now", labels=["queue"]
        )
        for queue in e.worker.lanes.queues:
            running.add_metric([queue.name], queue.running)
        yield running
        breaker = GaugeMetricFamily(
            "llm_router_breaker_state",
            "1 for the state of each model's (each deployment's) circuit breaker, as this "
            "process last saw it",
            labels=["model", "deployment", "local", "state"],
        )
        in_flight = GaugeMetricFamily(
            "llm_router_deployment_in_flight",
            "Calls this process has in flight to each deployment of a model",
            labels=["model", "deployment"],
        )
        unique = {cfg.label: cfg for cfg in e.router.models}  # a model may be in many chains
        for label, cfg in unique.items():
            seen = e.router.breakers.seen.get(label, "closed")
            server = server_of(cfg.api_base) if label != cfg.model else ""
            local = "true" if cfg.is_local else "false"
            for state in _BREAKER_STATES:
                value = 1.0 if seen == state else 0.0
                breaker.add_metric([cfg.model, server, local, state], value)
            if server:
                calls = e.router.deployments.running[cfg.endpoint]
                in_flight.add_metric([cfg.model, server], calls)
        yield breaker
        yield in_flight
        yield from e.shared_metrics()
        yield from e.server_metrics()


class Exporter:
    """Counts what this worker does and serves it, with the shared totals, on /metrics."""

    def __init__(
        self,
        settings: Settings,
        worker: Serving,
        router: Router,
        redis: Redis,
        watch: RedisWatch | None = None,
    ) -> None:
        self.settings = settings
        self.worker = worker
        self.router = router
        self.redis = redis
        self.watch = watch
        self._shared: dict[str, Any] = {}
        self._server: WSGIServer | None = None
        self._task: asyncio.Task[None] | None = None
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs = Counter(
            "llm_router_jobs", "Jobs this process finished, by result", ["chain", "status"],
            registry=r,
        )  # fmt: skip
        self.attempts = Counter(
            "llm_router_attempts", "Model attempts by outcome", ["model", "outcome"], registry=r
        )
        self.retries = Counter(
            "llm_router_retries", "Retries of transient failures, by model", ["model"], registry=r
        )
        self.tokens = Counter(
            "llm_router_tokens", "Tokens by model and kind", ["model", "kind"], registry=r
        )
        self.cost = Counter(
            "llm_router_cost_usd", "What this process's calls cost, USD", ["model"], registry=r
        )
        self.attempt_seconds = Histogram(
            "llm_router_attempt_duration_seconds", "One model attempt, wall time", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.job_seconds = Histogram(
            "llm_router_job_duration_seconds", "A job's chain, wall time", ["chain"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.cache_hits = Counter(
            "llm_router_cache_hits", "Jobs this process answered from the response cache",
            ["chain"], registry=r,
        )  # fmt: skip
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        r.register(_Live(self))

    def observe(self, result: RouteResult) -> None:
        self.jobs.labels(result.chain or "", result.status).inc()
        if result.status != "invalid_request":
            self.job_seconds.labels(result.chain or "").observe(result.latency_ms / 1000)
        if result.cached:
            self.cache_hits.labels(result.chain or "").inc()
        for a in result.attempts:
            self.attempts.labels(a.model, a.outcome).inc()
            if a.outcome == "skipped":
                continue
            self.attempt_seconds.labels(a.model).observe(a.latency_ms / 1000)
            if a.retries:
                self.retries.labels(a.model).inc(a.retries)
            for kind in ("input", "output", "cache_read_input", "cache_creation_input"):
                count = getattr(a, f"{kind}_tokens") or 0
                if count:
                    self.tokens.labels(a.model, kind).inc(count)
            if a.cost_usd:
                self.cost.labels(a.model).inc(a.cost_usd)

    async def start(self) -> bool:
        """Serve on ``metrics_host:metrics_port``; a port in use is logged, not fatal."""
        port = self.settings.metrics_port
        if port is None:
            return False
        try:
            self._server, _ = start_http_server(port, self.settings.metrics_host, self.registry)
        except OSError as exc:
            log.warning("metrics_port_unavailable", port=port, error=f"{type(exc).__name__}: {exc}")
            return False
        await self.refresh()
        self._task = asyncio.create_task(self._refresh_forever(), name="prometheus refresh")
        log.info("metrics_serving", host=self.settings.metrics_host, port=port)
        return True

    async def refresh(self) -> None:
        """Read the shared values once; keep the last ones while Redis is away."""
        s = self.settings
        now_ms = int(time.time() * 1000)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zcard(s.queue_name)
                pipe.zcard(s.batch_queue_name)
                pipe.zcount(WORKERS_KEY, now_ms, "+inf")
                pipe.hgetall(METRICS_COUNTERS_KEY)
                pipe.hgetall(spend_key(utc_day()))
                pipe.hgetall(CACHE_STATS_KEY)
                # This fleet's parked jobs: those of its batch queue, scored far ahead.
                pipe.zcount(s.batch_queue_name, now_ms + PARKED_SCORE_MS, "+inf")
                pipe.hlen(MsgBatchKeys(s.batch_queue_name).open)
                replies = await pipe.execute()
            depth, batch_depth, live, outcomes, spend, cache, parked, open_batches = replies
        except (RedisError, OSError):
            return
        self._shared = {
            "depth": {s.queue_name: depth, s.batch_queue_name: batch_depth},
            "live": live,
            "outcomes": parse_counters(outcomes),
            "spend": parse_day(utc_day(), spend),
            "cache": parse_stats(cache),
            "parked": parked,
            "open_batches": open_batches,
        }

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            await self.refresh()

    def server_metrics(self) -> Iterable[Metric]:
        """The Redis server as this worker last looked at it (shared: take max)."""
        state = self.watch.state if self.watch is not None else None
        if state is None:
            return
        if state.used_memory is not None:
            yield GaugeMetricFamily(
                "llm_router_redis_used_memory_bytes",
                "Memory Redis uses (shared)",
                value=state.used_memory,
            )
        if state.maxmemory is not None:
            yield GaugeMetricFamily(
                "llm_router_redis_maxmemory_bytes",
                "Redis's maxmemory, 0 for no limit (shared)",
                value=state.maxmemory,
            )
        if state.policy is not None:
            yield GaugeMetricFamily(
                "llm_router_redis_evicts",
                "1 when Redis's maxmemory-policy may evict queued jobs and results (shared)",
                value=1.0 if state.evicts else 0.0,
            )
        if state.persistent is not None:
            yield GaugeMetricFamily(
                "llm_router_redis_persistent",
                "1 when Redis keeps its data on disk (RDB or AOF) (shared)",
                value=1.0 if state.persistent else 0.0,
            )

    def shared_metrics(self) -> Iterable[Metric]:
        shared = self._shared
        if not shared:
            return
        s = self.settings
        depth = GaugeMetricFamily(
            "llm_router_queue_depth",
            "Jobs in the queue, running and parked ones too (shared: take max over workers)",
            labels=["queue", "lane"],
        )
        depth.add_metric([s.queue_name, "interactive"], shared["depth"][s.queue_name])
        depth.add_metric([s.batch_queue_name, "batch"], shared["depth"][s.batch_queue_name])
        yield depth
        yield GaugeMetricFamily(
            "llm_router_live_workers",
            "Workers with a live heartbeat (shared)",
            value=shared["live"],
        )
        yield GaugeMetricFamily(
            "llm_router_parked_jobs",
            "Jobs of this batch queue parked until their Message Batch answers (shared)",
            value=shared["parked"],
        )
        yield GaugeMetricFamily(
            "llm_router_open_batches",
            "This batch queue's Message Batches sent and not yet brought back (shared)",
            value=shared["open_batches"],
        )
        outcomes = GaugeMetricFamily(
            "llm_router_shared_outcomes",
            "Jobs' model outcomes counted by all workers since the hash was reset (shared)",
            labels=["model", "outcome"],
        )
        for model, counts in shared["outcomes"].items():
            for outcome, n in counts.model_dump().items():
                outcomes.add_metric([model, outcome], n)
        yield outcomes
        day = shared["spend"]
        spent = GaugeMetricFamily(
            "llm_router_spend_today_usd", "A chain's spend this UTC day (shared)", labels=["chain"]
        )
        budget = GaugeMetricFamily(
            "llm_router_budget_usd", "A chain's budget per UTC day (configured)", labels=["chain"]
        )
        for chain, c in day.chains.items():
            spent.add_metric([chain], c.spent_usd)
        for chain, usd in s.budgets.items():
            budget.add_metric([chain], usd)
        yield spent
        yield budget
        model_cost = GaugeMetricFamily(
            "llm_router_shared_cost_today_usd",
            "A model's cost this UTC day (shared)",
            labels=["model"],
        )
        for model, m in day.models.items():
            model_cost.add_metric([model], m.cost_usd)
        yield model_cost
        cache = GaugeMetricFamily(
            "llm_router_shared_cache_lookups",
            "Response cache lookups by every worker, by result (hit, miss), and answers "
            "stored (store), since the stats hash was reset (shared)",
            labels=["result"],
        )
        stats = shared["cache"]
        for kind, n in (("hit", stats.hits), ("miss", stats.misses), ("store", stats.stores)):
            cache.add_metric([kind], n)
        yield cache

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._server is not None:
            await asyncio.to_thread(self._server.shutdown)
            self._server.server_close()
            self._server = None
