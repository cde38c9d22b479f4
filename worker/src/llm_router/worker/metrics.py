"""Counters per model x outcome, shared by every worker, and the per-job event.

The counters live in one Redis hash (field ``<model>|<outcome>``) so all
workers add to the same totals. A job's counts are added at most once (a
marker key per job id), so a job that runs twice is not counted twice; and at
least once: the script that stores a result also lists the job as pending, and a
worker killed before it counted the job leaves it there for :meth:`Metrics.sweep`
(any worker, every few seconds) to count from the stored result.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from llm_router.client.backoff import Backoff
from llm_router.client.counters import CACHE_HITS_FIELD, parse_counters, read_counters
from llm_router.client.keys import (
    COUNTED_PREFIX,
    METRICS_CHANNEL,
    METRICS_COUNTERS_KEY,
    METRICS_PENDING_KEY,
    result_key,
)
from llm_router.client.protocol import RouteResult, result_from_blob
from llm_router.worker.lua import script

log = structlog.get_logger("llm_router.metrics")

RETRY_FOR_S = 600.0
#: A job stored this long ago and still not counted: its worker is presumed gone.
SWEEP_AFTER_S = 5.0
COUNTED_TTL_S = 86_400

# One round trip per job: count (once per job id), snapshot, publish. A job that ran
# twice (at-least-once delivery) is counted and announced once. KEYS, ARGV and
# returns: see the file.
_RECORD_LUA = script("metrics_record.lua")

Snapshot = dict[str, dict[str, int]]


def counter_fields(result: RouteResult) -> list[tuple[str, str]]:
    """The seed's rule: a rejected model is a fallback unless it was the last tried.

    A model skipped (busy, circuit open) was not tried: it counts as ``skipped``.
    """
    fields: list[tuple[str, str]] = []
    tried = [i for i, a in enumerate(result.attempts) if a.outcome != "skipped"]
    last = tried[-1] if tried else -1
    for i, attempt in enumerate(result.attempts):
        if attempt.outcome in ("success", "skipped"):
            fields.append((attempt.model, attempt.outcome))
        else:
            fields.append((attempt.model, "error" if i == last else "fallback"))
    return fields


def _snapshot(counts: Counter[tuple[str, str]]) -> Snapshot:
    fields = {f"{model}|{outcome}": n for (model, outcome), n in counts.items()}
    return {model: c.model_dump() for model, c in parse_counters(fields).items()}


def event_payload(
    result: RouteResult, snapshot: Snapshot, breakers: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
        "job_id": result.job_id,
        "context": result.context,
        "chain": result.chain,
        "status": result.status,
        "model_used": result.model_used,
        "latency_ms": result.latency_ms,
        "cost_usd": result.cost_usd,
        "cached": result.cached,
        "attempts": [a.model_dump() for a in result.attempts],
        "metrics_snapshot": snapshot,
        "breakers": breakers or {},
        "timestamp": time.time(),
    }


class Metrics:
    """Records each routed result; with no Redis it counts in memory, as the seed did."""

    def __init__(
        self,
        redis: Redis | None = None,
        channel: str = METRICS_CHANNEL,
        *,
        retry_for: float = RETRY_FOR_S,
    ) -> None:
        self.redis = redis
        self.channel = channel
        self.retry_for = retry_for
        self._local: Counter[tuple[str, str]] = Counter()
        self._retries: set[asyncio.Task[None]] = set()
        if redis is not None:
            self._record_script = redis.register_script(_RECORD_LUA)

    async def record(
        self, result: RouteResult, breakers: dict[str, str] | None = None
    ) -> dict[str, Any] | None:
        """Count and publish; return the event sent. Never raises.

        ``breakers``: the state of each model's circuit breaker as this job saw it.

        With Redis away, the counts are retried in the background (the script
        counts a job once however often it runs), so an outage does not make
        the counters lose the jobs that were served during it.
        """
        fields = counter_fields(result)
        if self.redis is None:
            self._local.update(fields)
            return event_payload(result, _snapshot(self._local), breakers)
        event = event_payload(result, {}, breakers)
        del event["metrics_snapshot"]
        head = json.dumps(event, ensure_ascii=False)[:-1]
        job_id = result.job_id or uuid.uuid4().hex
        keys = [METRICS_COUNTERS_KEY, COUNTED_PREFIX + job_id, METRICS_PENDING_KEY]
        args: list[str | int] = [COUNTED_TTL_S, self.channel, head, job_id]
        args += [f"{m}|{o}" for m, o in fields]
        if result.cached:  # no attempts to count: the hit is what happened
            args.append(CACHE_HITS_FIELD)
        try:
            snapshot = await self._record_script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            log.warning("metrics_delayed", job_id=result.job_id, error=f"{type(exc).__name__}")
            task = asyncio.create_task(self._retry(keys, args, result.job_id))
            self._retries.add(task)
            task.add_done_callback(self._retries.discard)
            return None
        except Exception as exc:
            log.warning(
                "metrics_failed", job_id=result.job_id, error=f"{type(exc).__name__}: {exc}"
            )
            return None
        event["metrics_snapshot"] = json.loads(snapshot)
        return event

    async def _retry(self, keys: list[str], args: list[str | int], job_id: str | None) -> None:
        deadline = time.monotonic() + self.retry_for
        backoff = Backoff(0.5, 10.0)
        while time.monotonic() < deadline:
            await asyncio.sleep(backoff.next())
            try:
                await self._record_script(keys=keys, args=args)
            except (RedisError, OSError):
                continue
            except Exception as exc:
                log.warning("metrics_failed", job_id=job_id, error=f"{type(exc).__name__}: {exc}")
            return
        log.warning("metrics_failed", job_id=job_id, error="Redis did not come back in time")

    async def sweep(self, older_than_s: float = SWEEP_AFTER_S, most: int = 100) -> int:
        """Count and announce the jobs whose worker stored their result but died before
        it counted them; return how many. Never raises."""
        if self.redis is None:
            return 0
        cutoff = int((time.time() - older_than_s) * 1000)
        try:
            ids = await self.redis.zrangebyscore(
                METRICS_PENDING_KEY, "-inf", cutoff, start=0, num=most
            )
            if not ids:
                return 0
            blobs = await self.redis.mget([result_key(i.decode()) for i in ids])
        except (RedisError, OSError):
            return 0
        swept = 0
        for job_id, blob in zip(ids, blobs, strict=True):
            if blob is None:  # expired or deleted: nothing left to count from
                with contextlib.suppress(RedisError, OSError):
                    await self.redis.zrem(METRICS_PENDING_KEY, job_id)
                continue
            result = result_from_blob(blob)
            result.job_id = job_id.decode()
            if await self.record(result) is not None:
                swept += 1
        if swept:
            log.info("metrics_swept", jobs=swept)
        return swept

    async def aclose(self) -> None:
        """Give pending background counts a last chance, then drop them."""
        if self._retries:
            await asyncio.wait(self._retries, timeout=5)
        for task in self._retries:
            task.cancel()

    async def snapshot(self) -> Snapshot:
        if self.redis is None:
            return _snapshot(self._local)
        return {model: c.model_dump() for model, c in (await read_counters(self.redis)).items()}
