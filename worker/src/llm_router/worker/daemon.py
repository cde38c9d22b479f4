"""arq's Worker, made fast and made not to lose jobs.

arq polls the queue, claims each job with a WATCH transaction and reads it
with another round trip; its producers poll for results; a dead worker's job
waits ~310 s for its in-progress key to expire; Redis going away ends the
worker; a second run of a job overwrites the first result. Here:

* the worker blocks on the queue's wake-up list (``BLPOP <queue>:wake``), which
  our producers push to when they enqueue; it polls only as a slow safety net
  for producers that write arq's keys alone, and takes no token while it has
  no free slot, so tokens reach idle workers; a queue with a backlog is claimed
  from again whenever a slot frees, so it drains at full speed;
* it serves the interactive queue first and a batch queue with the slots
  interactive work leaves (:mod:`~llm_router.worker.lanes`);
* one script (:mod:`~llm_router.worker.scripts`) finds due jobs, leases and reads
  them; another stores the first result, pushes it to the producer's reply list
  and releases the lease: two round trips around the job;
* a lease (``arq:in-progress:<id>`` = this worker's token) is renewed while the
  job runs; when the worker dies it lapses within ``lease_seconds`` and another
  worker takes the job; a job started more than ``max_tries`` times fails;
* on SIGTERM the worker stops taking jobs, lets running ones finish within the
  grace period and hands the rest back at once;
* Redis errors never end the worker (:mod:`~llm_router.worker.outage`).

Jobs keep arq's data model, so arq producers and tools still work with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from arq.connections import ArqRedis, create_pool
from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix
from arq.constants import result_key_prefix as arq_result_prefix
from arq.jobs import SerializationError, deserialize_job_raw
from arq.utils import ms_to_datetime, timestamp_ms
from arq.worker import JobExecutionFailed, Worker
from redis.exceptions import RedisError

from llm_router.client.connections import SentinelURL, sentinel_redis
from llm_router.client.protocol import (
    REPLY_TTL_S,
    RETRY_KEY_TTL_S,
    WAKE_TOKENS_MAX,
    RouteResult,
    idle_key,
    inbox_key,
    valid_reply_to,
)
from llm_router.worker import scripts
from llm_router.worker.lanes import Lanes, Queue
from llm_router.worker.outage import RedisOutage

log = structlog.get_logger("llm_router.worker")

WAKE_BLOCK_S = 5
# Past the running jobs at the head of the queue (they stay in it while leased),
# the claim script looks this far for jobs it can take.
CLAIM_SCAN_MAX = 2000

#: Work to do once a job's result is stored (metrics): registered by the job
#: function under ``ctx["after_finish"][job_id]``, run off the producer's clock.
AfterFinish = Callable[[], Awaitable[Any]]


def reply_to_of(job_blob: bytes | None) -> str | None:
    """The reply list a raw job blob names, if the blob can be read at all."""
    try:
        return valid_reply_to(json.loads(job_blob or b"null")["k"].get("reply_to"))
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return None


class RouterWorker(Worker):
    """An arq Worker woken by pushes, holding renewable leases, answering by push."""

    def __init__(
        self,
        *args: Any,
        lease_seconds: float = 10.0,
        batch_queue: str | None = None,
        batch_max_jobs: int | None = None,
        batch_keep_result: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        keep_s = int(self.keep_result_s)
        self.lanes = Lanes(
            self.queue_name,
            batch_queue,
            max_jobs=self.max_jobs,
            batch_max_jobs=batch_max_jobs,
            keep_result_s=keep_s,
            batch_keep_result_s=batch_keep_result or keep_s,
        )
        # The queue each leased job came from (its result TTL, where it goes back).
        self._queue_of: dict[str, Queue] = {}
        self.lease_ms = int(lease_seconds * 1000)
        self.token = uuid.uuid4().hex
        self.idle_key = idle_key(self.queue_name)
        self.inbox_key = inbox_key(self.queue_name, self.token)
        self._idle_member = f"{self.token}|{self.lease_ms}"
        self.outage = RedisOutage()
        self._wake = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._helpers: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        # Jobs whose lease this worker holds and renews (until their finish script runs).
        self._leased: set[str] = set()
        # Shared with job functions through ctx (arq copies ctx shallowly per job).
        self.replies: dict[str, str] = self.ctx.setdefault("replies", {})
        self.after_finish: dict[str, AfterFinish] = self.ctx.setdefault("after_finish", {})
        # The value of this worker's leases (arq:in-progress:<id>), also in its logs.
        self.ctx["worker_id"] = self.token
        self.ctx["worker"] = self
        # Told of every result this worker stores (the route job tells of its own),
        # and of SIGTERM: the heartbeat, systemd and Prometheus hang off these.
        self.observers: list[Callable[[RouteResult], None]] = self.ctx.setdefault("observers", [])
        self.on_stopping: list[Callable[[], None]] = []
        self.stopping = False

    # -- the loop ---------------------------------------------------------------------------

    async def main(self) -> None:
        if self._pool is None:
            self._pool = await self.outage.retry("start-up", self._connect)
        self.ctx["redis"] = self.pool
        if self.on_startup:
            await self.on_startup(self.ctx)
        self._claim = self.pool.register_script(scripts.CLAIM)
        self._renew = self.pool.register_script(scripts.RENEW)
        self._finish = self.pool.register_script(scripts.FINISH)
        self._register = self.pool.register_script(scripts.REGISTER)
        self._helpers = [
            asyncio.create_task(self._listen_for_wake_ups(), name="wake-up listener"),
            asyncio.create_task(self._renew_leases(), name="lease renewal"),
        ]
        while True:
            self._wake.clear()
            try:
                await self._poll_iteration()
            except (RedisError, OSError) as exc:
                await asyncio.sleep(self.outage.failed(exc, "polling the queue"))
                continue
            self.outage.ok()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_delay_s):
                    await self._wake.wait()

    async def _connect(self) -> ArqRedis:
        sentinel = getattr(self.redis_settings, "sentinel_url", None)
        if isinstance(sentinel, SentinelURL):
            # Not arq's Sentinel pool: ours takes the sentinels' password, TLS options and
            # timeouts, and moves to a new master as soon as the sentinels name one.
            timeout = self.redis_settings.conn_timeout if self.redis_settings else 5
            pool = sentinel_redis(sentinel, redis_class=ArqRedis, socket_connect_timeout=timeout)
            pool.job_serializer, pool.job_deserializer = self.job_serializer, self.job_deserializer
            pool.default_queue_name, pool.expires_extra_ms = self.queue_name, self.expires_extra_ms
            try:
                await pool.ping()
            except BaseException:
                await pool.aclose()
                raise
            return pool
        return await create_pool(
            self.redis_settings,
            job_deserializer=self.job_deserializer,
            job_serializer=self.job_serializer,
            default_queue_name=self.queue_name,
            expires_extra_ms=self.expires_extra_ms,
            # No retries of arq's own (with a log line each): ours back off quietly.
            retry=self.redis_settings.conn_retries if self.redis_settings else 0,
        )

    async def _listen_for_wake_ups(self) -> None:
        """While a slot is free, wait for a job handed over at enqueue (start it at
        once) or a wake-up token (poll at once); while full or stopping, take neither."""
        while True:
            if self.job_counter >= self.max_jobs or not self.allow_pick_jobs:
                await self._withdraw()
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            wake_keys = self.lanes.wake_keys(self.max_jobs - self.job_counter)
            try:
                await self._register(
                    keys=[self.idle_key], args=[self._idle_member, (WAKE_BLOCK_S + 2) * 1000]
                )
                popped = await self.pool.blpop(  # type: ignore[misc]
                    [self.inbox_key, *wake_keys], timeout=WAKE_BLOCK_S
                )
            except (RedisError, OSError) as exc:
                await asyncio.sleep(self.outage.failed(exc, "waiting for wake-ups"))
                continue
            self.outage.ok()
            if popped is None:
                continue
            key, value = popped
            if key.decode() == self.inbox_key:
                self._take_handed_job(value)
                await asyncio.sleep(0)  # let the job start before this loop's next round trip
            elif self.allow_pick_jobs:
                self._wake.set()
            else:
                # Stopping since the BLPOP began: the token belongs to another worker.
                with contextlib.suppress(RedisError, OSError):
                    await self.pool.lpush(key.decode(), "1")

    def _take_handed_job(self, message: bytes) -> None:
        """A producer leased this job to us in its enqueue script: run it, or hand it back
        when stopping or full (the poll may have filled the slot the producer saw free)."""
        job_id, tries, score, blob = message.split(b" ", 3)
        if self.allow_pick_jobs and self.job_counter < self.max_jobs:
            self._start(
                job_id.decode(), int(float(score)), blob, int(tries), self.lanes.interactive
            )
        else:
            self._leased.add(job_id.decode())
            self._in_background(self._store(job_id.decode(), b"", None))

    async def _withdraw(self) -> None:
        """Stop being offered jobs; hand back any that were handed over meanwhile."""
        with contextlib.suppress(RedisError, OSError):
            await self.pool.zrem(self.idle_key, self._idle_member)
            while (message := await self.pool.lpop(self.inbox_key)) is not None:  # type: ignore[misc]
                self._take_handed_job(message)

    async def _renew_leases(self) -> None:
        """Extend the lease of every running job, three times per lease."""
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            running = list(self._leased)
            if not running:
                continue
            try:
                lost = await self._renew(
                    keys=[in_progress_key_prefix + j for j in running],
                    args=[self.token, self.lease_ms],
                )
            except (RedisError, OSError) as exc:
                await asyncio.sleep(self.outage.failed(exc, "renewing leases"))
                continue
            self.outage.ok()
            for key in lost:
                job_id = key.decode()[len(in_progress_key_prefix) :]
                if job_id in self._leased:  # not a job that finished during the renewal
                    log.warning("lease_lost", job_id=job_id)

    async def _poll_iteration(self) -> None:
        for job_id, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[job_id]
        free = min(self.max_jobs - self.job_counter, self.queue_read_limit)
        if self.allow_pick_jobs and free > 0:
            wants = self.lanes.wants(free)
            claimed = await self._claim(
                keys=self.lanes.names,
                args=[
                    timestamp_ms(),
                    self.lease_ms,
                    free,
                    self.token,
                    CLAIM_SCAN_MAX,
                    RETRY_KEY_TTL_S,
                    *wants,
                ],
            )
            got = [0] * len(wants)
            for i in range(0, len(claimed), 5):
                index, job_id, score, blob, tries = claimed[i : i + 5]
                got[index] += 1
                queue = self.lanes.queues[index]
                self._start(job_id.decode(), int(float(score)), blob or None, int(tries), queue)
            self.lanes.claimed(wants, got)
        await self.heart_beat()

    def _start(
        self, job_id: str, score: int, blob: bytes | None, job_try: int, queue: Queue
    ) -> None:
        self.job_counter += 1
        queue.running += 1
        self._queue_of[job_id] = queue
        self._leased.add(job_id)
        task = self.loop.create_task(self._run(job_id, score, blob, job_try))
        task.add_done_callback(lambda _: self._job_done(queue))
        self.tasks[job_id] = task

    def _job_done(self, queue: Queue) -> None:
        # While full (the worker, or this queue's share), no wake-up tokens were taken.
        was_full = self.job_counter >= self.max_jobs or queue.running >= queue.max_jobs
        self.job_counter -= 1
        queue.running -= 1
        self._slot_freed.set()
        if was_full or self.lanes.backlog_waiting(self.max_jobs - self.job_counter):
            # Look for queued jobs now: a backlog outlasts its producers' wake-up tokens.
            self._wake.set()

    # -- one job ----------------------------------------------------------------------------

    async def _run(self, job_id: str, score: int, blob: bytes | None, job_try: int) -> None:
        """Run one leased job to a stored result, or hand it back; never raises."""
        try:
            await self._run_job(job_id, score, blob, job_try)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job_crashed", job_id=job_id)
        finally:
            self._leased.discard(job_id)
            self._queue_of.pop(job_id, None)
            self.replies.pop(job_id, None)
            after = self.after_finish.pop(job_id, None)
            if after is not None:
                self._in_background(after())

    async def _run_job(self, job_id: str, score: int, blob: bytes | None, job_try: int) -> None:
        started_ms = timestamp_ms()
        if blob is None:
            return await self._fail(job_id, blob, JobExecutionFailed("job expired"))
        try:
            name, args, kwargs, _, enqueued_ms = deserialize_job_raw(
                blob, deserializer=self.job_deserializer
            )
        except SerializationError as exc:
            return await self._fail(job_id, blob, exc)
        function = self.functions.get(name)
        if function is None:
            return await self._fail(
                job_id, blob, JobExecutionFailed(f"function {name!r} not found")
            )
        if job_try > self.max_tries:
            return await self._fail(
                job_id, blob, JobExecutionFailed(f"max {self.max_tries} retries exceeded")
            )
        ctx = {
            **self.ctx,
            "job_id": job_id,
            "job_try": job_try,
            "enqueue_time": ms_to_datetime(enqueued_ms),
            "score": score,
            "job_bytes": len(blob),
            "lane": self._queue(job_id).lane,
        }
        timeout = function.timeout_s or self.job_timeout_s
        success = True
        try:
            # asyncio.timeout, not wait_for: no extra task, so no extra turn of the loop.
            async with asyncio.timeout(timeout):
                result: Any = await function.coroutine(ctx, *args, **kwargs)
        except asyncio.CancelledError:
            # Stopping and out of grace: hand the job back for another worker now.
            self.jobs_retried += 1
            if await self._store(job_id, b"", None):
                log.info("job_handed_back", job_id=job_id)
            return
        except Exception as exc:  # the job function catches its own; this is a bug or timeout
            result, success = exc, False
            self._observe(job_id, exc)
        self.jobs_complete += success
        self.jobs_failed += not success
        encoded = self._result_blob(job_id, result, success, started_ms, job_try, name, enqueued_ms)
        await self._store(job_id, encoded, self.replies.get(job_id))

    async def _fail(self, job_id: str, blob: bytes | None, exc: BaseException) -> None:
        """A job that cannot run gets a result too, pushed to the reply list its blob names."""
        self.jobs_failed += 1
        log.warning("job_failed_to_start", job_id=job_id, error=str(exc)[:200])
        self._observe(job_id, exc)
        encoded = self._result_blob(job_id, exc, False, timestamp_ms())
        await self._store(job_id, encoded, reply_to_of(blob))

    def _result_blob(
        self,
        job_id: str,
        result: Any,
        success: bool,
        started_ms: int,
        job_try: int = 0,
        function: str = "",
        enqueued_ms: int = 0,
    ) -> bytes:
        """arq's result blob (the request is not copied back: ``a`` and ``k`` empty)."""
        assert self.job_serializer is not None
        return self.job_serializer(
            {"t": job_try, "f": function, "a": [], "k": {}, "et": enqueued_ms, "s": success,
             "r": result, "st": started_ms, "ft": timestamp_ms(), "q": self._queue(job_id).name,
             "id": job_id}
        )  # fmt: skip

    def _observe(self, job_id: str, exc: BaseException) -> None:
        failed = RouteResult(status="failed", error=f"{type(exc).__name__}: {exc}", job_id=job_id)
        for observe in self.observers:
            observe(failed)

    def _queue(self, job_id: str) -> Queue:
        return self._queue_of.get(job_id, self.lanes.interactive)

    async def _store(self, job_id: str, blob: bytes, reply_to: str | None) -> bool:
        """Run the finish script (an empty blob hands the job back); True when it did."""
        self._leased.discard(job_id)  # the script releases it; renewing now would find it gone
        queue = self._queue(job_id)
        ttl_ms = None if self.keep_result_forever else queue.keep_result_s * 1000
        keys = [
            arq_result_prefix + job_id,
            in_progress_key_prefix + job_id,
            retry_key_prefix + job_id,
            job_key_prefix + job_id,
            queue.name,
            reply_to or "",
            queue.wake_key,
        ]
        args = [job_id, self.token, blob, ttl_ms or "", REPLY_TTL_S, WAKE_TOKENS_MAX]

        async def finish() -> Any:
            return await self._finish(keys=keys, args=args)

        # While stopping, do not wait for Redis for ever: the lease lapses and
        # another worker runs the job again.
        give_up = None if self.allow_pick_jobs else 10.0
        try:
            done = await self.outage.retry("storing a result", finish, give_up_after=give_up)
        except (RedisError, OSError):
            log.warning("result_not_stored", job_id=job_id)
            return False
        if blob and not done:
            log.info("duplicate_run", job_id=job_id)
        return bool(done)

    def _in_background(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- stopping ---------------------------------------------------------------------------

    def handle_sig_wait_for_completion(self, signum: signal.Signals) -> None:
        running = sum(not task.done() for task in self.tasks.values())
        log.info(
            "worker_stopping",
            signal=signal.Signals(signum).name,
            running=running,
            grace_s=self._job_completion_wait,
        )
        self._begin_stopping()
        super().handle_sig_wait_for_completion(signum)

    def handle_sig(self, signum: signal.Signals) -> None:
        self._begin_stopping()
        super().handle_sig(signum)

    def _begin_stopping(self) -> None:
        if not self.stopping:
            self.stopping = True
            for hook in self.on_stopping:
                hook()

    async def _sleep_until_tasks_complete(self) -> None:
        running = [task for task in self.tasks.values() if not task.done()]
        if running:
            await asyncio.wait(running)

    async def close(self) -> None:
        """Stop helpers and let running jobs hand themselves back; survive a dead Redis."""
        for task in self._helpers:
            task.cancel()
        if not self._handle_signals:
            self.handle_sig(signal.SIGUSR1)
        if not self._pool:
            return
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        if self._background:
            await asyncio.wait(self._background, timeout=5)
        with contextlib.suppress(RedisError, OSError):
            await self.pool.delete(self.health_check_key)
        if self.on_shutdown:
            await self.on_shutdown(self.ctx)
        with contextlib.suppress(RedisError, OSError):
            await self.pool.close(close_connection_pool=True)
        self._pool = None
