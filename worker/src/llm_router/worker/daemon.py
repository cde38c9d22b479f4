"""arq's Worker, made fast and made not to lose jobs.

Fast path (arq polls the queue and claims each job with four round trips):

* the worker blocks on the queue's wake-up list (``BLPOP <queue>:wake``), which
  our producers push to in the enqueue script, and polls only as a slow
  safety net for producers that write arq's keys alone; a worker with no free
  slot does not take tokens, so an idle worker gets them;
* one Lua script finds and claims a batch of due jobs;
* the result is pushed to the producer's reply list in the script that
  stores it, so the producer blocks instead of polling.

Never losing a job (arq re-runs a dead worker's job only after ~310 s, exits
when Redis goes away, and overwrites results on a second run):

* a claim is a short lease (``in-progress`` key holding this worker's token)
  that a renewal task extends while the job runs; when the worker dies the
  lease lapses within ``lease_seconds`` and another worker takes the job;
* finishing is one script that stores the first result only: a job that ran
  twice leaves one result and one reply; a job that is started more than
  ``max_tries`` times (its workers keep dying) gets a ``failed`` result;
* on SIGTERM the worker stops taking jobs, lets running ones finish within the
  grace period and hands back the rest at once (lease dropped, wake-up sent);
* Redis errors never end the worker: it logs one line, backs off and goes on,
  and a result it could not store is retried until Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
from arq.connections import ArqRedis, create_pool
from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, retry_key_prefix
from arq.constants import result_key_prefix as arq_result_prefix
from arq.utils import timestamp_ms, to_ms
from arq.worker import Worker
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from llm_router.client.protocol import REPLY_TTL_S, WAKE_TOKENS_MAX, valid_reply_to, wake_key

log = structlog.get_logger("llm_router.worker")

T = TypeVar("T")

# KEYS[1] queue. ARGV: now ms, lease ms, most jobs to claim, in-progress prefix, token,
# most queue entries to look at. Jobs being run stay in the queue, so the script pages
# past them. Returns id, score, id, score ... for the jobs this worker now holds.
_CLAIM_LUA = """
local want, scan_max = tonumber(ARGV[3]), tonumber(ARGV[6])
local out, seen = {}, 0
while #out < 2 * want and seen < scan_max do
  local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', seen, 100)
  if #ids == 0 then break end
  seen = seen + #ids
  for _, id in ipairs(ids) do
    if #out < 2 * want and redis.call('SET', ARGV[4] .. id, ARGV[5], 'NX', 'PX', ARGV[2]) then
      out[#out + 1] = id
      out[#out + 1] = redis.call('ZSCORE', KEYS[1], id)
    end
  end
end
return out
"""

# KEYS: in-progress keys. ARGV: token, lease ms. Returns the keys no longer ours.
_RENEW_LUA = """
local lost = {}
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
  else
    lost[#lost + 1] = key
  end
end
return lost
"""

# KEYS: result, in-progress, retry, job, queue, abort set, reply list ('' for none), wake.
# ARGV: job id, token, result blob ('' = hand the job back), result ttl ms ('' = forever),
#       reply ttl s, wake-up cap.
# Returns 1 when this call stored the result, 0 when a result was already there.
_FINISH_LUA = """
local function release()
  if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
end
if ARGV[3] == '' then
  if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
  redis.call('DEL', KEYS[2])
  if tonumber(redis.call('GET', KEYS[3]) or '0') > 0 then redis.call('DECR', KEYS[3]) end
  redis.call('LPUSH', KEYS[8], '1')
  redis.call('LTRIM', KEYS[8], 0, tonumber(ARGV[6]) - 1)
  return 1
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  release()
  return 0
end
if ARGV[4] == '' then
  redis.call('SET', KEYS[1], ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
end
if KEYS[7] ~= '' then
  redis.call('LPUSH', KEYS[7], ARGV[3])
  redis.call('EXPIRE', KEYS[7], ARGV[5])
end
redis.call('DEL', KEYS[3], KEYS[4])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('ZREM', KEYS[6], ARGV[1])
release()
return 1
"""

WAKE_BLOCK_S = 5
# Past the running jobs at the head of the queue (they stay in it while leased),
# the claim script looks this far for jobs it can take.
CLAIM_SCAN_MAX = 2000
_TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError)


class RedisOutage:
    """Shared by everything a worker does with Redis: one log line when Redis goes
    away, one when it is back, and the backoff in between."""

    def __init__(self) -> None:
        self.failures = 0
        self.since = 0.0

    def failed(self, exc: BaseException, during: str) -> float:
        self.failures += 1
        if self.failures == 1:
            self.since = time.monotonic()
            log.warning("redis_unavailable", during=during, error=f"{type(exc).__name__}: {exc}")
        backoff: float = min(0.2 * 2.0 ** min(self.failures - 1, 10), 5.0)
        return backoff

    def ok(self) -> None:
        if self.failures:
            down_s = round(time.monotonic() - self.since, 1)
            log.info("redis_back", down_s=down_s, failed_calls=self.failures)
        self.failures = 0

    async def retry(
        self, during: str, call: Callable[[], Awaitable[T]], *, give_up_after: float | None = None
    ) -> T:
        """Retry ``call`` through an outage, with backoff, until it succeeds."""
        deadline = None if give_up_after is None else time.monotonic() + give_up_after
        while True:
            try:
                value = await call()
            except (RedisError, OSError) as exc:
                if deadline is not None and time.monotonic() > deadline:
                    raise
                await asyncio.sleep(self.failed(exc, during))
            else:
                self.ok()
                return value


def reply_to_of(job_blob: bytes | None) -> str | None:
    """The reply list a raw job blob names, if the blob can be read at all."""
    try:
        return valid_reply_to(json.loads(job_blob or b"null")["k"].get("reply_to"))
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


class RouterWorker(Worker):
    """An arq Worker woken by pushes, holding renewable leases, answering by push."""

    def __init__(self, *args: Any, lease_seconds: float = 10.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lease_ms = int(lease_seconds * 1000)
        self.token = uuid.uuid4().hex
        self.wake_key = wake_key(self.queue_name)
        self._wake = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._helpers: list[asyncio.Task[None]] = []
        self.outage = RedisOutage()
        # job id -> the producer's reply list, filled by the job function
        self.replies: dict[str, str] = self.ctx.setdefault("replies", {})
        # The value of this worker's leases (arq:in-progress:<id>), also in its logs.
        self.ctx["worker_id"] = self.token

    async def main(self) -> None:
        if self._pool is None:
            self._pool = await self.outage.retry("start-up", self._connect)
        self.ctx["redis"] = self.pool
        if self.on_startup:
            await self.on_startup(self.ctx)
        self._claim = self.pool.register_script(_CLAIM_LUA)
        self._renew = self.pool.register_script(_RENEW_LUA)
        self._finish = self.pool.register_script(_FINISH_LUA)
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
        return await create_pool(
            self.redis_settings,
            job_deserializer=self.job_deserializer,
            job_serializer=self.job_serializer,
            default_queue_name=self.queue_name,
            expires_extra_ms=self.expires_extra_ms,
            retry=self.redis_settings.conn_retries if self.redis_settings else 0,
        )

    async def _listen_for_wake_ups(self) -> None:
        """Take a wake-up token only while a slot is free, then poll at once."""
        while True:
            if self.job_counter >= self.max_jobs or not self.allow_pick_jobs:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                token = await self.pool.blpop([self.wake_key], timeout=WAKE_BLOCK_S)  # type: ignore[misc]
            except (RedisError, OSError) as exc:
                await asyncio.sleep(self.outage.failed(exc, "waiting for wake-ups"))
                continue
            self.outage.ok()
            if token is None:
                continue
            if self.allow_pick_jobs:
                self._wake.set()
            else:
                # Stopping since the BLPOP began: the token belongs to another worker.
                with contextlib.suppress(RedisError, OSError):
                    await self.pool.lpush(self.wake_key, "1")

    async def _renew_leases(self) -> None:
        """Extend the lease of every running job, three times per lease."""
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            running = [job_id for job_id, task in self.tasks.items() if not task.done()]
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
                log.warning("lease_lost", job_id=key.decode()[len(in_progress_key_prefix) :])

    async def _poll_iteration(self) -> None:
        for job_id, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[job_id]
        free = self.max_jobs - self.job_counter
        if self.allow_pick_jobs and free > 0:
            claimed = await self._claim(
                keys=[self.queue_name],
                args=[
                    timestamp_ms(),
                    self.lease_ms,
                    min(free, self.queue_read_limit),
                    in_progress_key_prefix,
                    self.token,
                    CLAIM_SCAN_MAX,
                ],
            )
            for raw_id, raw_score in zip(claimed[::2], claimed[1::2], strict=True):
                await self._start(raw_id.decode(), int(float(raw_score)))
        await self.heart_beat()

    async def _start(self, job_id: str, score: int) -> None:
        await self.sem.acquire()  # never blocks: at most `free` jobs were claimed
        self.job_counter += 1
        task = self.loop.create_task(self.run_job(job_id, score))
        task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
        self.tasks[job_id] = task

    def _release_sem_dec_counter_on_complete(self) -> None:
        super()._release_sem_dec_counter_on_complete()
        self._slot_freed.set()
        self._wake.set()  # a slot is free: look for queued jobs now

    async def run_job(self, job_id: str, score: int) -> None:
        """arq's run_job, but nothing it raises may stop the worker."""
        try:
            await super().run_job(job_id, score)
        except asyncio.CancelledError:
            raise
        except _TRANSIENT as exc:
            # Redis went away before the job started; the lease lapses and it runs later.
            log.warning("job_not_started", job_id=job_id, error=f"{type(exc).__name__}: {exc}")
        except Exception:
            log.exception("job_crashed", job_id=job_id)

    def handle_sig_wait_for_completion(self, signum: signal.Signals) -> None:
        running = sum(not task.done() for task in self.tasks.values())
        log.info(
            "worker_stopping",
            signal=signal.Signals(signum).name,
            running=running,
            grace_s=self._job_completion_wait,
        )
        super().handle_sig_wait_for_completion(signum)

    async def _sleep_until_tasks_complete(self) -> None:
        running = [task for task in self.tasks.values() if not task.done()]
        if running:
            await asyncio.wait(running)

    async def finish_job(
        self,
        job_id: str,
        finish: bool,
        result_data: bytes | None,
        result_timeout_s: float | None,
        keep_result_forever: bool,
        incr_score: int | None,
        keep_in_progress: float | None,
    ) -> None:
        """Store the first result only, push it to the producer, release the lease."""
        reply_to = self.replies.pop(job_id, None)
        if not finish or not result_data:
            # Cancelled (shutdown) or retried: hand the job back for another worker now.
            if await self._finish_script(job_id, b"", None, None):
                log.info("job_handed_back", job_id=job_id)
            return
        ttl = None if keep_result_forever else result_timeout_s
        await self._finish_script(job_id, result_data, ttl, reply_to)

    async def finish_failed_job(self, job_id: str, result_data: bytes | None) -> None:
        """arq's path for jobs it could not start: same rules, first result wins."""
        reply_to = self.replies.pop(job_id, None)
        if reply_to is None:
            # The job function never ran (poison job, unknown function...): the producer
            # still waits on its reply list, if the blob names one.
            with contextlib.suppress(RedisError, OSError):
                reply_to = reply_to_of(await self.pool.get(job_key_prefix + job_id))
        ttl = None if self.keep_result_forever else self.keep_result_s
        blob = result_data or self.job_serializer(  # type: ignore[misc]
            {"id": job_id, "r": RuntimeError("the job's result could not be serialized")}
        )
        await self._finish_script(job_id, blob, ttl, reply_to)

    async def _finish_script(
        self, job_id: str, blob: bytes, ttl_s: float | None, reply_to: str | None
    ) -> bool:
        """Run the finish script; True when it stored the result (or handed the job back)."""
        keys = [
            arq_result_prefix + job_id,
            in_progress_key_prefix + job_id,
            retry_key_prefix + job_id,
            job_key_prefix + job_id,
            self.queue_name,
            abort_jobs_ss,
            reply_to or "",
            self.wake_key,
        ]
        args = [job_id, self.token, blob, "" if ttl_s is None else to_ms(ttl_s) or "", REPLY_TTL_S]
        args.append(WAKE_TOKENS_MAX)

        async def finish() -> Any:
            return await self._finish(keys=keys, args=args)

        # While stopping, do not wait for Redis for ever: the job's lease lapses and
        # another worker runs it again.
        give_up = None if self.allow_pick_jobs else 10.0
        try:
            stored = await self.outage.retry("storing a result", finish, give_up_after=give_up)
        except (RedisError, OSError):
            log.warning("result_not_stored", job_id=job_id)
            return False
        if blob and not stored:
            log.info("duplicate_run", job_id=job_id)
        return bool(stored)

    async def close(self) -> None:
        """Stop helpers and let running jobs hand themselves back; survive a dead Redis."""
        for task in self._helpers:
            task.cancel()
        if not self._handle_signals:
            self.handle_sig(signal.SIGUSR1)
        if not self._pool:
            return
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        with contextlib.suppress(RedisError, OSError):
            await self.pool.delete(self.health_check_key)
        if self.on_shutdown:
            await self.on_shutdown(self.ctx)
        with contextlib.suppress(RedisError, OSError):
            await self.pool.close(close_connection_pool=True)
        self._pool = None
