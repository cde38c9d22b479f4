"""arq's Worker with a push-driven fast path.

arq polls the queue every ``poll_delay`` and claims each job with a WATCH
transaction of four round trips; its producers poll for results. Here:

* the worker blocks on the queue's wake-up list (``BLPOP <queue>:wake``), which
  our producers push to in the same script that enqueues, and polls only as a
  slow safety net for producers that write arq's keys alone;
* a worker with no free slot does not take wake-up tokens, so an idle worker
  gets them instead;
* one Lua script finds and claims a batch of due jobs (one round trip);
* the result is pushed to the producer's reply list (``reply_to``) in the same
  transaction that stores it, so the producer blocks instead of polling.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog
from arq.connections import create_pool
from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, retry_key_prefix
from arq.constants import result_key_prefix as arq_result_prefix
from arq.utils import timestamp_ms, to_ms
from arq.worker import Worker

from llm_router.client.protocol import REPLY_TTL_S, wake_key

log = structlog.get_logger("llm_router.worker")

# KEYS[1] queue. ARGV: now ms, in-progress ttl ms, most jobs to claim, in-progress prefix.
# Returns id, score, id, score ... for the jobs this worker now owns.
_CLAIM_LUA = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
  if redis.call('SET', ARGV[4] .. id, '1', 'NX', 'PX', ARGV[2]) then
    out[#out + 1] = id
    out[#out + 1] = redis.call('ZSCORE', KEYS[1], id)
  end
end
return out
"""

WAKE_BLOCK_S = 5


class RouterWorker(Worker):
    """An arq Worker woken by pushes, claiming in batches, answering by push."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.wake_key = wake_key(self.queue_name)
        self._wake = asyncio.Event()
        self._slot_freed = asyncio.Event()
        # job id -> the producer's reply list, filled by the job function
        self.replies: dict[str, str] = self.ctx.setdefault("replies", {})

    async def main(self) -> None:
        if self._pool is None:
            self._pool = await create_pool(
                self.redis_settings,
                job_deserializer=self.job_deserializer,
                job_serializer=self.job_serializer,
                default_queue_name=self.queue_name,
                expires_extra_ms=self.expires_extra_ms,
            )
        self.ctx["redis"] = self.pool
        if self.on_startup:
            await self.on_startup(self.ctx)
        self._claim = self.pool.register_script(_CLAIM_LUA)
        listener = asyncio.create_task(self._listen_for_wake_ups(), name="wake-up listener")
        try:
            while True:
                self._wake.clear()
                await self._poll_iteration()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_delay_s):
                        await self._wake.wait()
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    async def _listen_for_wake_ups(self) -> None:
        """Take a wake-up token only while a slot is free, then poll at once."""
        while True:
            if self.job_counter >= self.max_jobs or not self.allow_pick_jobs:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                token = await self.pool.blpop([self.wake_key], timeout=WAKE_BLOCK_S)  # type: ignore[misc]
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("wake_up_listener_error", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(1.0)
                continue
            if token is not None:
                self._wake.set()

    async def _poll_iteration(self) -> None:
        free = self.max_jobs - self.job_counter
        if self.allow_pick_jobs and free > 0:
            claimed = await self._claim(
                keys=[self.queue_name],
                args=[
                    timestamp_ms(),
                    int(self.in_progress_timeout_s * 1000),
                    min(free, self.queue_read_limit),
                    in_progress_key_prefix,
                ],
            )
            for raw_id, raw_score in zip(claimed[::2], claimed[1::2], strict=True):
                await self._start(raw_id.decode(), int(float(raw_score)))
        for job_id, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[job_id]
                task.result()  # surface errors in run_job itself
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
        """arq's finish_job, plus the push to the producer's reply list."""
        reply_to = self.replies.pop(job_id, None)
        async with self.pool.pipeline(transaction=True) as tr:
            delete_keys = []
            in_progress_key = in_progress_key_prefix + job_id
            if keep_in_progress is None:
                delete_keys.append(in_progress_key)
            else:
                tr.pexpire(in_progress_key, to_ms(keep_in_progress))
            if finish:
                if result_data:
                    expire = None if keep_result_forever else result_timeout_s
                    tr.set(arq_result_prefix + job_id, result_data, px=to_ms(expire))
                    if reply_to is not None:
                        tr.lpush(reply_to, result_data)
                        tr.expire(reply_to, REPLY_TTL_S)
                delete_keys += [retry_key_prefix + job_id, job_key_prefix + job_id]
                tr.zrem(abort_jobs_ss, job_id)
                tr.zrem(self.queue_name, job_id)
            elif incr_score:
                tr.zincrby(self.queue_name, incr_score, job_id)
            if delete_keys:
                tr.delete(*delete_keys)
            await tr.execute()
