"""Message Batches: the batch lane's cloud leg at half the price, answered within 24 h.

A batch-lane job that reaches a model with ``batch_api`` is *parked*
(:meth:`RedisQueue.park <llm_router.worker.queue.RedisQueue.park>`): its state goes to
Redis, its request joins that model's waiting list, and it gives up its job slot and
every capacity slot; nobody waits for it but its producer. The workers fill the
batches together: whichever holds the send lease sends a model's waiting requests as
one batch once ``batch_size`` of them wait or the oldest has waited ``batch_wait``.
Whichever holds the poll lease looks at the open batches every ``batch_poll``; when
one has ended, each result is kept with its job, and the job goes back to its queue at
its old place. A worker resumes it at that model: the answer goes through the same
checks, and a rejected, errored or expired one falls to the next model of the chain.

Everything lives in Redis, so a worker killed at any point loses no job: a take of
requests being sent stays listed until its batch is known (then it is put back), an
open batch is looked at by whichever worker polls next, and putting a result back is
idempotent. A batch created while Redis is away is recorded once it is back (if within
4½ minutes). One window remains: a sender killed after Anthropic created a batch and
before Redis heard of it sends those requests again (a second batch, paid twice; each
job is still answered once).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, Literal

import anthropic
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from llm_router.client.backoff import Backoff
from llm_router.client.keys import (
    MSGBATCH_SWEEP_LEASE,
    PARKED_DEADLINES_KEY,
    PARKED_KEY,
    MsgBatchKeys,
    cancel_key,
    parked_key,
)
from llm_router.client.protocol import WAKE_TOKENS_MAX, now_ms
from llm_router.worker.lua import script
from llm_router.worker.parked import PARK_KEEP_MS, ParkedJob, parse_parked
from llm_router.worker.settings import ModelConfig, Settings

log = structlog.get_logger("llm_router.batches")

#: The API takes at most 256 MB a batch; this leaves room for the framing.
MAX_BATCH_BYTES = 200 * 1024 * 1024
#: A take not known to be in a batch after this long is put back (its sender died).
SENDING_STALE_MS = 300_000
#: How long a sender keeps trying to tell Redis of a batch it created: until shortly
#: before its take would be put back and sent again.
RECORD_FOR_S = SENDING_STALE_MS / 1000 - 30
#: The leases' length: a sender or poller that dies is replaced after this long (two at
#: once would be harmless: a take is one sender's, and putting a result back is
#: idempotent). A poll renews its lease at each batch it looks at.
LEASE_MS = 30_000
#: How often one worker (of any fleet: the parked set is shared) looks for parked jobs
#: cancelled while no worker listened (a cancel's marker is kept a day, longer than any
#: batch runs).
CANCEL_SWEEP_MS = 60_000
#: Parked jobs whose cancel markers are read per round trip.
SWEEP_CHUNK = 1000
#: Results kept and their jobs queued again per pipelined round trip.
PUT_BACK_CHUNK = 500
#: A request an ended batch did not list (the API lists every one; a net all the same).
MISSING = {"type": "missing_result", "message": "the ended batch listed no result"}

_TAKE = script("msgbatch_take.lua")
_OPENED = script("msgbatch_opened.lua")
_RETURN = script("msgbatch_return.lua")
_UNPARK = script("unpark.lua")
_RELEASE = script("park_release.lua")
#: A parked job's deadline is acted on this long after it passed: the worker's clock may
#: run a little ahead of Redis', which the job's deadline key counts on.
DEADLINE_MARGIN_MS = 1000


# -- the fleet's batches ---------------------------------------------------------------------


def _base_url(api_base: str | None) -> str | None:
    """The SDK's base URL from litellm's ``api_base`` (which may name the messages path)."""
    if not api_base:
        return None
    base = api_base.rstrip("/")
    for tail in ("/v1/messages", "/v1"):
        if base.endswith(tail):
            base = base[: -len(tail)]
    return base


class MessageBatches:
    """Sends parked requests as Message Batches and brings their results back; one
    instance per worker, shared state in Redis."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = MsgBatchKeys(settings.batch_queue_name)
        self.models: dict[str, ModelConfig] = {
            m.label: m for chain in settings.chains.values() for m in chain if m.batch_api
        }
        self.token = uuid.uuid4().hex
        #: Jobs this process parked, results it brought back, batches it sent.
        self.parked_here = 0
        self.resumed_here = 0
        self.sent_here = 0
        self._clients: dict[str, anthropic.AsyncAnthropic] = {}
        self._take = redis.register_script(_TAKE)
        self._opened = redis.register_script(_OPENED)
        self._return = redis.register_script(_RETURN)
        self._unpark = redis.register_script(_UNPARK)
        self._release = redis.register_script(_RELEASE)
        self._next_poll = 0.0

    def tally(self) -> dict[str, int]:
        """This process's share, for its heartbeat."""
        return {"parked": self.parked_here, "resumed": self.resumed_here, "sent": self.sent_here}

    def client(self, cfg: ModelConfig) -> anthropic.AsyncAnthropic:
        found = self._clients.get(cfg.label)
        if found is None:
            key = cfg.api_key.get_secret_value() if cfg.api_key is not None else None
            found = self._clients[cfg.label] = anthropic.AsyncAnthropic(
                api_key=key, base_url=_base_url(cfg.api_base), max_retries=2, timeout=120.0
            )
        return found

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()

    async def parked(self, job_id: str) -> ParkedJob | None:
        fields = await self.redis.hgetall(parked_key(job_id))  # type: ignore[misc]
        return parse_parked(fields) if fields else None

    # -- the background task -------------------------------------------------------------------

    async def run(self) -> None:
        """Send what is due and look at open batches, for as long as the worker runs."""
        tick = min(1.0, self.settings.batch_wait / 4, self.settings.batch_poll / 2)
        failing = False
        swept = False
        while True:
            try:
                await self.release_overdue()
                await self.release_cancelled(at_start=not swept)
                swept = True
                await self.send_due()
                if time.monotonic() >= self._next_poll:
                    self._next_poll = time.monotonic() + self.settings.batch_poll
                    await self.poll()
                failing = False
            except (RedisError, OSError) as exc:
                if not failing:
                    log.warning("batches_unreachable", error=f"{type(exc).__name__}: {exc}")
                failing = True
            await asyncio.sleep(tick)

    async def release(self, job_id: str) -> bool:
        """A parked job stops waiting (its producer cancelled it, or its deadline
        passed): back to its queue, to end at once. False: it was not parked."""
        keys = [parked_key(job_id), PARKED_KEY, PARKED_DEADLINES_KEY]
        released = bool(await self._release(keys=keys, args=[job_id, WAKE_TOKENS_MAX]))
        if released:
            log.info("parked_job_released", job_id=job_id)
        return released

    async def release_overdue(self) -> int:
        """Release the parked jobs whose deadline has passed; how many."""
        due = await self.redis.zrangebyscore(
            PARKED_DEADLINES_KEY, "-inf", now_ms() - DEADLINE_MARGIN_MS, start=0, num=500
        )
        return sum([await self.release(job_id.decode()) for job_id in due])

    async def release_cancelled(self, *, at_start: bool = False) -> int:
        """Release the parked jobs whose producer cancelled them while no worker was
        subscribed (a restart, an outage): the cancel's marker stays, and every worker
        reads the markers when it starts, then one worker a minute. How many; 0 when it
        was another worker's turn."""
        turn = await self._lease(MSGBATCH_SWEEP_LEASE, CANCEL_SWEEP_MS)
        if not (turn or at_start):
            return 0
        marked: list[str] = []
        start = 0
        # Pages by rank: a job that leaves meanwhile may hide another from this pass,
        # never from the next.
        while chunk := await self.redis.zrange(PARKED_KEY, start, start + SWEEP_CHUNK - 1):
            ids = [job_id.decode() for job_id in chunk]
            found = await self.redis.mget([cancel_key(job_id) for job_id in ids])
            marked += [job_id for job_id, mark in zip(ids, found, strict=True) if mark]
            start += SWEEP_CHUNK
        return sum([await self.release(job_id) for job_id in marked])

    async def _lease(self, key: str, ms: int = LEASE_MS) -> bool:
        return bool(await self.redis.set(key, self.token, nx=True, px=ms))

    async def _renew(self, key: str) -> None:
        if await self.redis.get(key) == self.token.encode():
            await self.redis.pexpire(key, LEASE_MS)

    async def _unlease(self, key: str) -> None:
        if await self.redis.get(key) == self.token.encode():
            await self.redis.delete(key)

    async def send_due(self) -> int:
        """Send every model's due requests (under the send lease); how many batches."""
        now = now_ms()
        due_before = now - int(self.settings.batch_wait * 1000)
        models = [m.decode() for m in await self.redis.zrange(self.keys.models, 0, -1)]
        stale = await self.redis.zrangebyscore(self.keys.sending, "-inf", now - SENDING_STALE_MS)
        if not models and not stale:
            return 0
        if not await self._lease(self.keys.send_lease):
            return 0
        sent = 0
        try:
            for take in stale:
                await self._give_back(take.decode(), now)
            oldest = dict(await self.redis.zrange(self.keys.models, 0, -1, withscores=True))
            for raw_model, score in oldest.items():
                model = raw_model.decode()
                size = await self.redis.llen(self.keys.pending(model))  # type: ignore[misc]
                while size >= self.settings.batch_size or (size and score <= due_before):
                    went = await self._send(model)
                    if went == "stopped":
                        break
                    sent += went == "sent"
                    size = await self.redis.llen(self.keys.pending(model))  # type: ignore[misc]
                    # What is left is due when its own oldest request is.
                    score = await self.redis.zscore(self.keys.models, model) or now
        finally:
            await self._unlease(self.keys.send_lease)
        return sent

    async def _give_back(self, take: str, score: int) -> None:
        model = take.split("|", 1)[1]
        keys = [self.keys.take(take), self.keys.sending,
                self.keys.pending(model), self.keys.models]  # fmt: skip
        back = await self._return(keys=keys, args=[take, model, score])
        log.warning("batch_requests_returned", model=model, requests=int(back))

    async def _send(self, model: str) -> Literal["sent", "dropped", "stopped"]:
        """Take one batch's worth of a model's requests and create the batch (``sent``);
        ``dropped``: none of them was still wanted; ``stopped``: nothing more to send now."""
        take = f"{uuid.uuid4().hex}|{model}"
        keys = [self.keys.pending(model), self.keys.models,
                self.keys.take(take), self.keys.sending]  # fmt: skip
        most = min(self.settings.batch_size, 100_000)
        args: list[str | int] = [model, most, MAX_BATCH_BYTES, take, now_ms()]
        entries = [json.loads(e) for e in await self._take(keys=keys, args=args)]
        if not entries:
            return "stopped"
        cfg = self.models.get(model)
        if cfg is None:  # a model this worker does not know: another worker's to send
            await self._give_back(take, now_ms())
            return "stopped"
        entries = await self._still_waiting(entries)
        if not entries:  # every one was cancelled or expired meanwhile
            await self.redis.delete(self.keys.take(take))
            await self.redis.zrem(self.keys.sending, take)
            return "dropped"
        requests = [{"custom_id": e["custom_id"], "params": e["params"]} for e in entries]
        try:
            batch = await self.client(cfg).messages.batches.create(requests=requests)  # type: ignore[arg-type]
        except anthropic.APIError as exc:
            log.warning("batch_not_sent", model=model, requests=len(entries),
                        error=f"{type(exc).__name__}: {str(exc)[:200]}")  # fmt: skip
            await self._give_back(take, now_ms())
            return "stopped"
        kept = {"model": model, "sent_ms": now_ms(),
                "jobs": {e["custom_id"]: e["job_id"] for e in entries}}  # fmt: skip
        await self._record_opened(batch.id, kept, take)
        self.sent_here += 1
        log.info("batch_sent", model=model, batch_id=batch.id, requests=len(entries))
        return "sent"

    async def _record_opened(self, batch_id: str, kept: dict[str, Any], take: str) -> None:
        """A batch Anthropic created must become known to Redis, or its take goes back
        and its requests are sent (and paid) again: through a Redis outage the record is
        retried until just before the take would be given back."""
        keys = [self.keys.open, self.keys.take(take), self.keys.sending]
        args = [batch_id, json.dumps(kept, separators=(",", ":")), take]
        backoff = Backoff(0.1, 5.0)
        give_up = time.monotonic() + RECORD_FOR_S
        while True:
            try:
                await self._opened(keys=keys, args=args)
                return
            except (RedisError, OSError) as exc:
                wait = backoff.next()
                if time.monotonic() + wait > give_up:
                    log.error("batch_not_recorded", batch_id=batch_id, requests=len(kept["jobs"]),
                              error=f"{type(exc).__name__}: {exc}")  # fmt: skip
                    raise
                if backoff.failures == 1:
                    log.warning("batch_record_retrying", batch_id=batch_id,
                                error=f"{type(exc).__name__}: {exc}")  # fmt: skip
                await asyncio.sleep(wait)

    async def _still_waiting(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The entries whose job still waits for this request: one that was cancelled,
        expired or deleted meanwhile is not sent (nobody would use its answer)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry in entries:
                pipe.hmget(parked_key(entry["job_id"]), ["custom_id", "stopped"])
            found = await pipe.execute()
        return [
            e
            for e, (custom_id, stopped) in zip(entries, found, strict=True)
            if custom_id == e["custom_id"].encode() and stopped is None
        ]

    async def poll(self) -> int:
        """Look at every open batch (under the poll lease); how many jobs were put back.
        Jobs parked longer than they are kept (their job deleted meanwhile) are dropped
        from the parked count."""
        await self.redis.zremrangebyscore(PARKED_KEY, "-inf", now_ms() - PARK_KEEP_MS)
        if not await self.redis.hlen(self.keys.open):  # type: ignore[misc]
            return 0
        if not await self._lease(self.keys.poll_lease):
            return 0
        back = 0
        try:
            for raw_id, raw in (await self.redis.hgetall(self.keys.open)).items():  # type: ignore[misc]
                await self._renew(self.keys.poll_lease)
                back += await self._look_at(raw_id.decode(), json.loads(raw))
        finally:
            await self._unlease(self.keys.poll_lease)
        return back

    async def _look_at(self, batch_id: str, kept: dict[str, Any]) -> int:
        cfg = self.models.get(kept["model"])
        if cfg is None:
            return 0
        client = self.client(cfg)
        try:
            batch = await client.messages.batches.retrieve(batch_id)
            if batch.processing_status != "ended":
                return 0
            jobs: dict[str, str] = kept["jobs"]
            back, seen = 0, set()
            rows: list[tuple[str, str, dict[str, Any]]] = []
            async for row in await client.messages.batches.results(batch_id):
                job_id = jobs.get(row.custom_id)
                if job_id is None:
                    continue
                seen.add(row.custom_id)
                rows.append((job_id, row.custom_id, row.result.to_dict()))
                if len(rows) >= PUT_BACK_CHUNK:
                    back += await self._put_back(rows, batch_id)
                    rows.clear()
        except anthropic.APIError as exc:
            log.warning("batch_unread", batch_id=batch_id,
                        error=f"{type(exc).__name__}: {str(exc)[:200]}")  # fmt: skip
            return 0
        missing = {"type": "errored", "error": {"type": "error", "error": MISSING}}
        # The API lists every request; a net all the same.
        rows += [(jobs[c], c, missing) for c in set(jobs) - seen]
        back += await self._put_back(rows, batch_id)
        await self.redis.hdel(self.keys.open, batch_id)  # type: ignore[misc]
        log.info("batch_ended", model=kept["model"], batch_id=batch_id, requests=len(jobs),
                 **batch.request_counts.to_dict())  # fmt: skip
        self.resumed_here += back
        return back

    async def _put_back(self, rows: list[tuple[str, str, dict[str, Any]]], batch_id: str) -> int:
        """Keep each ``(job id, custom id, result)`` with its job and queue the job again,
        one pipelined round trip for all; how many jobs went back."""
        if not rows:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id, custom_id, result in rows:
                blob = json.dumps(result, separators=(",", ":"), ensure_ascii=False)
                await self._unpark(
                    keys=[parked_key(job_id), PARKED_KEY, PARKED_DEADLINES_KEY],
                    args=[job_id, custom_id, blob, batch_id, WAKE_TOKENS_MAX],
                    client=pipe,
                )
            done = await pipe.execute()
        return sum(int(d) for d in done)
