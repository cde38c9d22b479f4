"""The Redis side of the queue: claim, renew, finish, hand back, wait for work.

Keys and blobs are arq's (:mod:`llm_router.client.keys`), so arq's producers and
tools still understand them; every step is one of the scripts in
:mod:`llm_router.worker.lua`, one atomic round trip each (their headers give KEYS,
ARGV and returns). ``arq:in-progress:<id>`` holds the token of the worker that
leases the job. What to claim, when, and what to run is the loop's
(:mod:`llm_router.worker.loop`); this module only talks to Redis.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from llm_router.client.keys import (
    CANCEL_CHANNEL,
    FAILED_KEY,
    METRICS_PENDING_KEY,
    PARKED_DEADLINES_KEY,
    PARKED_KEY,
    PARKED_SCORE_MS,
    MsgBatchKeys,
    failed_key,
    idle_key,
    in_progress_key,
    inbox_key,
    job_key,
    parked_key,
    result_key,
    retry_key,
)
from llm_router.client.protocol import REPLY_TTL_S, RETRY_KEY_TTL_S, WAKE_TOKENS_MAX
from llm_router.worker.lanes import Lane, Lanes
from llm_router.worker.lua import script
from llm_router.worker.outage import RedisOutage

#: Past the running jobs at the head of a queue (they stay in it while leased), the
#: claim script looks this far for jobs it can take.
CLAIM_SCAN_MAX = 2000

# KEYS, ARGV and returns: see the files.
_CLAIM = script("claim.lua")
_RENEW = script("renew_leases.lua")
_FINISH = script("finish.lua")
_REGISTER = script("register_idle.lua")
_PARK = script("park.lua")


@dataclass(frozen=True, slots=True)
class Claimed:
    """A job this worker holds the lease of: where it came from, its blob and try number.

    ``blob`` is None when the job's key had expired or been deleted. ``deadline_ms``: what
    was left of its deadline when it was claimed (None: no deadline key, or it has
    passed; the request says whether it had one). ``handed``: a producer's enqueue
    handed it over at once (its deadline is all there). ``cancelled``: a producer asked
    to cancel it before it started.
    """

    job_id: str
    lane: Lane
    score: int
    blob: bytes | None
    tries: int
    deadline_ms: int | None = None
    cancelled: bool = False
    handed: bool = False
    #: It was parked for a Message Batch: its state is to be read back.
    parked: bool = False


@dataclass(frozen=True, slots=True)
class Parking:
    """A job to park until its Message Batch answers (:mod:`~llm_router.worker.batches`):
    its state and its request's entry as JSON (None: keep the state it has, send
    nothing), under which model and custom id, for how long, until which deadline."""

    model: str
    custom_id: str
    state: str | None
    entry: str | None
    keep_ms: int
    #: The job's deadline (Unix ms): past it, it stops waiting and ends ``expired``.
    deadline_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Woken:
    """A wake-up token taken from a queue's list: there may be a job to claim."""

    key: str


class RedisQueue:
    """The queues one worker serves (interactive first, then batch), on one Redis."""

    def __init__(
        self,
        redis: Redis,
        lanes: Lanes,
        *,
        token: str,
        lease_ms: int,
        outage: RedisOutage | None = None,
        failed_keep: int = 1000,
        failed_keep_s: int = 7 * 86_400,
    ) -> None:
        self.redis = redis
        self.lanes = lanes
        #: The value of this worker's leases (``arq:in-progress:<id>``).
        self.token = token
        self.lease_ms = lease_ms
        self.outage = outage or RedisOutage()
        #: The failed-job registry's bounds: how many, and how long (``llm-router failed``).
        self.failed_keep = failed_keep
        self.failed_keep_ms = failed_keep_s * 1000
        self.idle_key = idle_key(lanes.interactive.name)
        self.inbox_key = inbox_key(lanes.interactive.name, token)
        self._idle_member = f"{token}|{lease_ms}"
        self._claim = redis.register_script(_CLAIM)
        self._renew = redis.register_script(_RENEW)
        self._finish = redis.register_script(_FINISH)
        self._register = redis.register_script(_REGISTER)
        self._park = redis.register_script(_PARK)

    async def claim(self, wants: Sequence[int], free: int) -> list[Claimed]:
        """Lease and read due jobs: at most ``wants[i]`` from lane ``i``, ``free`` in all."""
        raw = await self._claim(
            keys=self.lanes.names,
            args=[
                int(time.time() * 1000),
                self.lease_ms,
                free,
                self.token,
                CLAIM_SCAN_MAX,
                RETRY_KEY_TTL_S,
                *wants,
            ],
        )
        claimed = []
        for i in range(0, len(raw), 8):
            index, job_id, score, blob, tries, left_ms, cancelled, parked = raw[i : i + 8]
            claimed.append(
                Claimed(
                    job_id.decode(),
                    self.lanes.queues[int(index)],
                    int(float(score)),
                    blob or None,
                    tries,
                    left_ms if left_ms >= 0 else None,
                    bool(cancelled),
                    parked=bool(parked),
                )
            )
        return claimed

    async def renew(self, job_ids: Iterable[str]) -> tuple[list[str], list[str]]:
        """Extend this worker's leases; return the jobs whose lease is no longer ours, and
        those a producer asked to cancel."""
        keys = [in_progress_key(j) for j in job_ids]
        if not keys:
            return [], []
        lost, cancelled = await self._renew(keys=keys, args=[self.token, self.lease_ms])
        prefix = in_progress_key("")
        return [k.decode().removeprefix(prefix) for k in lost], [
            k.decode().removeprefix(prefix) for k in cancelled
        ]

    async def cancel_requests(self) -> AsyncIterator[str]:
        """The ids of jobs producers ask to cancel, as they publish them. Ends when Redis
        goes away (the caller listens again; the lease renewal sees the markers anyway)."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(CANCEL_CHANNEL)
            while True:
                message = await pubsub.get_message(timeout=None)
                if message is not None and message.get("type") == "message":
                    data = message["data"]
                    yield data.decode() if isinstance(data, bytes) else str(data)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def finish(
        self,
        job: Claimed,
        blob: bytes,
        reply_to: str | None,
        *,
        announce: bool,
        register: bool = False,
    ) -> bool:
        """Store the first result of a job, push it to the producer's reply list, release
        the lease; ``announce`` marks it for the metrics (counted and announced once,
        by this worker or, if it dies first, another); ``register`` keeps the job and its
        result in the failed-job registry. False: another run's result was there already."""
        entry = b""
        if register and self.failed_keep > 0:
            text = json.dumps(job.blob.decode("utf-8", "replace") if job.blob else None)
            entry = b'{"job_id":%s,"queue":%s,"job":%s,"result":%s}' % (
                json.dumps(job.job_id).encode(),
                json.dumps(job.lane.name).encode(),
                text.encode(),
                blob,
            )
        return await self._run_finish(job.job_id, job.lane, blob, reply_to, announce, entry)

    async def park(self, job: Claimed, parking: Parking) -> bool:
        """Park a job until its Message Batch answers: it keeps its place in its queue but
        no worker claims it, and the lease is released; False when it was not ours."""
        batches = MsgBatchKeys(job.lane.name)
        keys = [in_progress_key(job.job_id), job.lane.name, parked_key(job.job_id), PARKED_KEY,
                batches.pending(parking.model), batches.models, job_key(job.job_id),
                retry_key(job.job_id), PARKED_DEADLINES_KEY]  # fmt: skip
        now = int(time.time() * 1000)
        args: list[str | int] = [job.job_id, self.token, parking.state or "",
                parking.entry or "", now, now + parking.keep_ms + PARKED_SCORE_MS,
                parking.keep_ms, parking.model, job.score, parking.custom_id,
                "" if parking.deadline_ms is None else parking.deadline_ms]  # fmt: skip
        return bool(await self._park(keys=keys, args=args))

    async def hand_back(self, job_id: str, lane: Lane) -> bool:
        """Release a job unfinished: it stays queued, the start is not counted, and a
        wake-up token calls another worker. False: the lease was no longer ours."""
        return await self._run_finish(job_id, lane, b"", None, False, b"")

    async def _run_finish(
        self,
        job_id: str,
        lane: Lane,
        blob: bytes,
        reply_to: str | None,
        announce: bool,
        entry: bytes,
    ) -> bool:
        keys = [
            result_key(job_id),
            in_progress_key(job_id),
            retry_key(job_id),
            job_key(job_id),
            lane.name,
            reply_to or "",
            lane.wake_key,
            METRICS_PENDING_KEY,
            FAILED_KEY,
            failed_key(job_id),
        ]
        args: list[str | bytes | int] = [
            job_id,
            self.token,
            blob,
            lane.keep_result_s * 1000,
            REPLY_TTL_S,
            WAKE_TOKENS_MAX,
            "1" if announce else "",
            entry,
            self.failed_keep,
            self.failed_keep_ms,
        ]
        done = await self._finish(keys=keys, args=args)
        return bool(done)

    async def wait_for_work(self, lanes: Sequence[Lane], block_s: float) -> Claimed | Woken | None:
        """Offer this worker to producers (whose enqueue may hand it a job at once) and
        block until a job is handed over, a wake-up token arrives on one of ``lanes``,
        or ``block_s`` passes."""
        async with self.redis.pipeline(transaction=False) as pipe:  # one round trip
            await self._register(
                keys=[self.idle_key],
                args=[self._idle_member, int((block_s + 2) * 1000)],
                client=pipe,
            )
            pipe.blpop(
                [self.inbox_key, *(lane.wake_key for lane in lanes)],
                timeout=block_s,  # type: ignore[arg-type]  # Redis takes seconds as a float
            )
            registered, popped = await pipe.execute(raise_on_error=False)
        # The BLPOP ran even if the registration failed (a full Redis refuses its write):
        # what it popped is acted on, never dropped with the error.
        if isinstance(popped, Exception):
            raise popped
        if popped is None:
            if isinstance(registered, Exception):
                raise registered
            return None
        key, value = popped[0].decode(), popped[1]
        return self._handed(value) if key == self.inbox_key else Woken(key)

    async def withdraw(self) -> list[Claimed]:
        """Stop being offered jobs; return any that were handed over meanwhile."""
        await self.redis.zrem(self.idle_key, self._idle_member)
        handed = []
        while (message := await self.redis.lpop(self.inbox_key)) is not None:  # type: ignore[misc]
            handed.append(self._handed(message))
        return handed

    async def return_token(self, woken: Woken) -> None:
        """Give back a wake-up token this worker will not act on (it is stopping)."""
        with contextlib.suppress(RedisError, OSError):
            await self.redis.lpush(woken.key, "1")  # type: ignore[misc]

    def _handed(self, message: bytes) -> Claimed:
        """A job a producer's enqueue script leased to this worker: "<id> <try> <score> <blob>"."""
        job_id, tries, score, blob = message.split(b" ", 3)
        lane = self.lanes.interactive
        return Claimed(job_id.decode(), lane, int(float(score)), blob, int(tries), handed=True)
