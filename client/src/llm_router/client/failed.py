"""The failed-job registry: jobs that ended ``failed`` or ``expired``, kept with their
request and result so that someone can look at them and run them again.

Workers write it as they store such a result (``finish.lua``), bounded by the
``failed_keep`` and ``failed_keep_seconds`` settings; ``llm-router failed`` reads it.
An entry is ``llm_router:failed:<id>``, JSON ``{"job_id", "queue", "job": <the job blob
as it came>, "result": <the result blob>}``; ``llm_router:failed`` orders them by when
they failed. A requeued job runs exactly once more: its try counter, result and metrics
marker go, so it counts as a new job; if it fails again it is back in the registry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from llm_router.client.keys import (
    COUNTED_PREFIX,
    FAILED_KEY,
    cancel_key,
    deadline_key,
    failed_key,
    job_key,
    result_key,
    retry_key,
    wake_key,
)
from llm_router.client.lua import script
from llm_router.client.protocol import (
    JOB_TTL_MS,
    WAKE_TOKENS_MAX,
    RouteResult,
    expires_ms,
    now_ms,
    result_from_blob,
)

# KEYS, ARGV and returns: see the file.
_REQUEUE_LUA = script("failed_requeue.lua")
_REFUSALS = {
    0: "not in the registry",
    -1: "it expired before it ran: there is no job blob to run again",
    -2: "its queue changed meanwhile",
    -3: "it is queued or running already",
}


@dataclass(frozen=True)
class FailedJob:
    """One entry of the registry."""

    job_id: str
    queue: str
    failed_at: float
    #: The job blob as the producer wrote it (None: the job had expired unread).
    job: str | None
    result: RouteResult

    @property
    def request(self) -> dict[str, Any] | None:
        """The request, as far as the job blob can be read."""
        try:
            data = json.loads(self.job or "null")
            args = data.get("a") or [data.get("k", {}).get("request")]
            return args[0] if isinstance(args[0], dict) else None
        except (ValueError, TypeError, AttributeError, IndexError):
            return None


class FailedJobs:
    """Read, requeue and purge the registry."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._requeue = redis.register_script(_REQUEUE_LUA)

    async def count(self) -> int:
        return int(await self.redis.zcard(FAILED_KEY))

    async def ids(self, limit: int | None = None) -> list[tuple[str, float]]:
        """Newest first: (job id, when it failed, Unix seconds)."""
        end = -1 if limit is None else limit - 1
        pairs = await self.redis.zrevrange(FAILED_KEY, 0, end, withscores=True)
        return [(i.decode(), score / 1000) for i, score in pairs]

    async def list(self, limit: int | None = 50) -> list[FailedJob]:
        """The newest entries (those that lapsed meanwhile are left out)."""
        ids = await self.ids(limit)
        if not ids:
            return []
        blobs = await self.redis.mget([failed_key(i) for i, _ in ids])
        return [
            entry
            for (job_id, at), blob in zip(ids, blobs, strict=True)
            if (entry := _entry(job_id, at, blob)) is not None
        ]

    async def show(self, job_id: str) -> FailedJob | None:
        at = await self.redis.zscore(FAILED_KEY, job_id)
        blob = await self.redis.get(failed_key(job_id))
        return _entry(job_id, (at or 0) / 1000, blob)

    async def requeue(self, job_id: str) -> str | None:
        """Put the job back on its queue; None when done, else why not."""
        entry = await self.show(job_id)
        if entry is None:
            return _REFUSALS[0]
        request = entry.request or {}
        expires_in = request.get("expires_in")
        deadline = expires_ms(expires_in if isinstance(expires_in, int | float) else None)
        keys = [
            FAILED_KEY,
            failed_key(job_id),
            job_key(job_id),
            result_key(job_id),
            retry_key(job_id),
            entry.queue,
            wake_key(entry.queue),
            COUNTED_PREFIX + job_id,
            deadline_key(job_id),
            cancel_key(job_id),
        ]
        args: list[str | int] = [job_id, JOB_TTL_MS, now_ms(), WAKE_TOKENS_MAX - 1, deadline]
        answer = int(await self._requeue(keys=keys, args=args))
        return None if answer == 1 else _REFUSALS.get(answer, f"refused ({answer})")

    async def purge(self) -> int:
        """Forget every entry; return how many there were."""
        ids = [i for i, _ in await self.ids()]
        for start in range(0, len(ids), 500):
            await self.redis.delete(*(failed_key(i) for i in ids[start : start + 500]))
        await self.redis.delete(FAILED_KEY)
        return len(ids)


def _entry(job_id: str, failed_at: float, blob: bytes | None) -> FailedJob | None:
    if blob is None:
        return None
    try:
        data = json.loads(blob)
    except ValueError:
        return None
    job = data.get("job") if isinstance(data, dict) else None
    result = json.dumps(data.get("result")) if isinstance(data, dict) else "null"
    return FailedJob(
        job_id=job_id,
        queue=str(data.get("queue", "")) if isinstance(data, dict) else "",
        failed_at=failed_at,
        job=job if isinstance(job, str) else None,
        result=result_from_blob(result),
    )
