"""Results pushed to the producer: one reply list per client, one reader for all waits.

Each job a :class:`~llm_router.client.client.RouterClient` enqueues names the
client's reply list (``reply_to``); the worker pushes the result blob there as
it stores it. One task blocks on that list (``BLPOP``) for every waiting call,
so a thousand concurrent waits cost one connection, not a thousand polls.
As a safety net (a worker that does not push, a reply list lost with a Redis
restart) the reader also looks at the result keys of long waits every
``fallback_poll`` seconds, and a wait checks its result key once more before
it times out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict

from redis.asyncio import Redis
from redis.exceptions import RedisError

from llm_router.client.backoff import Backoff
from llm_router.client.keys import REPLY_PREFIX, result_key
from llm_router.client.protocol import RouteResult, result_from_blob

log = logging.getLogger("llm_router.client")

_BLOCK_MAX_S = 1.0
_DRAIN = 256  # replies taken per round trip once one has arrived
_MGET_CHUNK = 500
_ARRIVED_MAX = 10_000


class ReplyInbox:
    """Delivers pushed results to the calls waiting for them."""

    def __init__(self, redis: Redis, *, fallback_poll: float = 2.0) -> None:
        self.key = REPLY_PREFIX + uuid.uuid4().hex
        self.fallback_poll = fallback_poll
        self._redis = redis
        self._waiters: dict[str, list[asyncio.Future[RouteResult]]] = {}
        self._since: dict[str, float] = {}
        # Jobs enqueued with this reply list whose result nobody has taken yet.
        self._expected: set[str] = set()
        self._arrived: OrderedDict[str, RouteResult] = OrderedDict()
        self._reader: asyncio.Task[None] | None = None

    def expect(self, job_id: str) -> None:
        self._expected.add(job_id)

    async def wait(self, job_id: str, timeout: float | None) -> RouteResult:
        if job_id in self._arrived:
            return self._take(job_id, self._arrived.pop(job_id))
        future: asyncio.Future[RouteResult] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, []).append(future)
        self._since.setdefault(job_id, time.monotonic())
        try:
            if job_id not in self._expected:
                # Not ours (or evicted from memory): no reply will come, so look first.
                with contextlib.suppress(RedisError):  # the reader retries through an outage
                    await self._check_keys([job_id])
            self._ensure_reader()
            try:
                async with asyncio.timeout(timeout):
                    return await future  # this call's own future: cancelling it is fine
            except TimeoutError:
                blob = None
                with contextlib.suppress(RedisError):  # a reply lost on the way: the key has it
                    blob = await self._redis.get(result_key(job_id))
                if blob is not None:
                    self._expected.discard(job_id)
                    return result_from_blob(blob)
                raise TimeoutError(f"no result for job {job_id} within {timeout}s") from None
        finally:
            self._forget(job_id, future)

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None

    def _take(self, job_id: str, result: RouteResult) -> RouteResult:
        self._expected.discard(job_id)
        return result

    def _forget(self, job_id: str, future: asyncio.Future[RouteResult]) -> None:
        waiting = self._waiters.get(job_id, [])
        if future in waiting:
            waiting.remove(future)
        if not waiting:
            self._waiters.pop(job_id, None)
            self._since.pop(job_id, None)

    def _ensure_reader(self) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read(), name="llm-router reply reader")

    def _deliver(self, result: RouteResult) -> None:
        job_id = result.job_id
        if job_id is None:
            return
        waiting = self._waiters.get(job_id)
        if waiting:
            self._expected.discard(job_id)
            for future in waiting:
                if not future.done():
                    future.set_result(result)
        elif job_id in self._expected:
            self._arrived[job_id] = result
            if len(self._arrived) > _ARRIVED_MAX:
                evicted, _ = self._arrived.popitem(last=False)
                self._expected.discard(evicted)  # its wait will read the result key

    async def _read(self) -> None:
        last_sweep = time.monotonic()
        backoff = Backoff(0.2, 5.0)
        while self._waiters:
            try:
                item = await self._redis.blpop(
                    [self.key],
                    timeout=min(_BLOCK_MAX_S, self.fallback_poll),  # type: ignore[arg-type]
                )  # type: ignore[misc]
                if item is not None:
                    self._deliver(result_from_blob(item[1]))
                    await asyncio.sleep(0)  # the waiting call resumes before our next round trip
                    if self._waiters:  # more are expected: take what else has come, at once
                        more = await self._redis.lpop(self.key, _DRAIN)  # type: ignore[misc]
                        for blob in more or []:
                            self._deliver(result_from_blob(blob))
                if time.monotonic() - last_sweep >= self.fallback_poll:
                    last_sweep = time.monotonic()
                    cutoff = last_sweep - self.fallback_poll
                    await self._check_keys([j for j, t in self._since.items() if t <= cutoff])
                backoff.reset()
            except RedisError as exc:
                delay = backoff.next()
                log.warning("reply reader: Redis error (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)

    async def _check_keys(self, job_ids: list[str]) -> None:
        for start in range(0, len(job_ids), _MGET_CHUNK):
            chunk = job_ids[start : start + _MGET_CHUNK]
            blobs = await self._redis.mget([result_key(j) for j in chunk])
            for job_id, blob in zip(chunk, blobs, strict=True):
                if blob is not None:
                    result = result_from_blob(blob)
                    result.job_id = result.job_id or job_id
                    self._deliver(result)
