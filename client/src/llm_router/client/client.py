"""The producer side: enqueue a routing job, wait for its result."""

from __future__ import annotations

import asyncio
import enum
import os
import time
import uuid
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

from llm_router.client.backoff import Backoff
from llm_router.client.connections import redis_from_url
from llm_router.client.keys import (
    CANCEL_CHANNEL,
    DEFAULT_QUEUE,
    cancel_key,
    deadline_key,
    idle_key,
    inbox_key,
    job_key,
    result_key,
    wake_key,
)
from llm_router.client.lua import script
from llm_router.client.protocol import (
    JOB_TTL_MS,
    RETRY_KEY_TTL_S,
    WAKE_TOKENS_MAX,
    Attempt,
    RouteRequest,
    RouteResult,
    expires_ms,
    job_blob,
    now_ms,
)
from llm_router.client.replies import ReplyInbox
from llm_router.client.server import RedisFull, refused_for_memory

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

# One round trip; an existing job id (a retried enqueue) is never queued twice. When a
# worker is waiting, the job is handed to it here. KEYS, ARGV and returns: see the file.
_ENQUEUE_LUA = script("enqueue.lua")

#: A cancel marker outlives any job that can still be queued (its key lives a day).
CANCEL_TTL_S = 86_400

#: ``LLM_ROUTER_PRODUCER_MODE=1`` makes ``RouterClient()`` default to ``handover=False``.
PRODUCER_MODE_ENV = "LLM_ROUTER_PRODUCER_MODE"
_TRUE = ("1", "true", "yes", "on")

MessagesLike = str | Sequence[dict[str, Any]]


class Unset(enum.Enum):
    """An argument not given (where None means something)."""

    UNSET = 0


UNSET = Unset.UNSET


class NotReplicated(RedisConnectionError):
    """An enqueue the master took but fewer replicas than asked for confirmed in time.

    A connection error to the enqueue's retry loop (and to callers): a job only on
    the master is lost if a failover comes first. Repeating the enqueue is safe.
    """


class RouteFailed(Exception):
    """Every model in the chain was rejected, or the request was refused as invalid."""

    def __init__(self, result: RouteResult) -> None:
        self.result = result
        reasons = "; ".join(f"{a.model}: {a.reason}" for a in result.attempts)
        detail = result.error or "all models failed"
        super().__init__(f"{result.status}: {detail}" + (f" ({reasons})" if reasons else ""))

    @property
    def attempts(self) -> list[Attempt]:
        return self.result.attempts


def build_request(
    messages: MessagesLike,
    *,
    schema: dict[str, Any] | None = None,
    context: str | None = None,
    chain: str | None = None,
    metadata: dict[str, Any] | None = None,
    expires_in: float | None = None,
    cache_ttl: int | None = None,
) -> RouteRequest:
    """Validate a request before it is enqueued; a bare string is one user message.
    ``expires_in`` makes it a version 2 request, ``cache_ttl`` a version 3 one."""
    msgs = [{"role": "user", "content": messages}] if isinstance(messages, str) else messages
    fields: dict[str, Any] = {"messages": list(msgs), "schema": schema, "context": context}
    if chain is not None:
        fields["chain"] = chain
    if metadata is not None:
        fields["metadata"] = metadata
    if expires_in is not None:
        fields["expires_in"] = expires_in
        fields["v"] = 2
    if cache_ttl is not None:
        fields["cache_ttl"] = cache_ttl
        fields["v"] = 3
    return RouteRequest.model_validate(fields)


class JobHandle:
    """A job that has been enqueued; ``await handle.result()`` waits for it."""

    def __init__(self, client: RouterClient, job_id: str) -> None:
        self._client = client
        self.job_id = job_id

    def __repr__(self) -> str:
        return f"JobHandle(job_id={self.job_id!r})"

    async def result(
        self, timeout: float | None = 120.0, *, raise_on_failure: bool = True
    ) -> RouteResult:
        """Wait for the result; raise ``TimeoutError`` when it does not come in time."""
        result = await self._client.wait(self.job_id, timeout=timeout)
        if raise_on_failure and not result.ok:
            raise RouteFailed(result)
        return result


class RouterClient:
    """Async client for producers; defaults come from ``LLM_ROUTER_*`` variables.

    ``handover`` (default ``True``; ``False`` when ``LLM_ROUTER_PRODUCER_MODE=1`` and
    the argument is not given) chooses how a job is enqueued:

    * ``True``: one Lua script (``lua/enqueue.lua``) queues the job and, when a worker
      is waiting, hands it over at once (it writes the worker's lease, try counter and
      inbox, and reads the idle set), so the producer needs access to workers' keys.
    * ``False``, *producer mode*: plain commands only, for a Redis ACL user that may not
      touch the workers' keys (docs/protocol.md, "Redis ACLs"). ``EXISTS`` on the job
      and result keys (skip when either is there), then one ``MULTI``: ``SET
      arq:job:<id> NX PX``, ``ZADD NX`` to the queue, ``LPUSH`` + ``LTRIM`` of the
      wake-up list. No script, lease, try counter, idle set or inbox; results still
      come back on the reply list. It costs one more round trip per enqueue, and the
      job waits for a worker's wake-up instead of being handed over.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        queue_name: str | None = None,
        redis: Redis | None = None,
        fallback_poll: float = 2.0,
        reconnect_for: float = 30.0,
        wait_for_replicas: int = 0,
        replica_timeout: float = 1.0,
        handover: bool | None = None,
    ) -> None:
        self.redis_url = redis_url or os.environ.get("LLM_ROUTER_REDIS_URL", DEFAULT_REDIS_URL)
        self.queue_name = queue_name or os.environ.get("LLM_ROUTER_QUEUE_NAME", DEFAULT_QUEUE)
        self._owns_redis = redis is None
        self.redis: Redis = redis or redis_from_url(
            self.redis_url, socket_connect_timeout=5, health_check_interval=30
        )
        self.reconnect_for = reconnect_for
        # With N > 0, an enqueue returns once N replicas have the job (Redis WAIT),
        # so a failover cannot lose it; it is retried until then (see NotReplicated).
        self.wait_for_replicas = wait_for_replicas
        self.replica_timeout = replica_timeout
        if handover is None:
            handover = os.environ.get(PRODUCER_MODE_ENV, "").strip().lower() not in _TRUE
        self.handover = handover
        self._enqueue_script = self.redis.register_script(_ENQUEUE_LUA)
        self._wake_key = wake_key(self.queue_name)
        self._idle_key = idle_key(self.queue_name)
        self._inbox_prefix = inbox_key(self.queue_name, "")  # the script adds the worker
        self.inbox = ReplyInbox(self.redis, fallback_poll=fallback_poll)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.inbox.aclose()
        if self._owns_redis:
            await self.redis.aclose()

    async def enqueue(
        self,
        messages: MessagesLike,
        *,
        schema: dict[str, Any] | None = None,
        context: str | None = None,
        chain: str | None = None,
        metadata: dict[str, Any] | None = None,
        job_id: str | None = None,
        expires_in: float | None = None,
        cache_ttl: int | None = None,
    ) -> JobHandle:
        """Validate and enqueue one request; a repeated ``job_id`` is not queued again.
        Raises :class:`~llm_router.client.server.RedisFull` when Redis refuses the write
        for want of memory (nothing of the job is written).

        ``expires_in``: seconds, counted on Redis' clock from now, after which the job
        is not started (and a running one starts no further model); its result is then
        ``expired``. None: it waits for a worker as long as its key lives (a day).

        ``cache_ttl``: seconds; the same request (chain, messages, schema) answered ``ok``
        within them is answered from the response cache, and this answer is kept as long
        (0: neither, whatever the chain's default). None: the chain's default.
        """
        request = build_request(
            messages,
            schema=schema,
            context=context,
            chain=chain,
            metadata=metadata,
            expires_in=expires_in,
            cache_ttl=cache_ttl,
        )
        return await self.enqueue_request(request, job_id=job_id)

    async def enqueue_request(
        self, request: RouteRequest, *, job_id: str | None = None
    ) -> JobHandle:
        job_id = job_id or uuid.uuid4().hex
        enqueue_ms = now_ms()
        blob = job_blob(request, enqueue_ms, reply_to=self.inbox.key)
        keys = [
            job_key(job_id),
            result_key(job_id),
            self.queue_name,
            self._wake_key,
            self._idle_key,
        ]
        args: list[bytes | str | int] = [
            blob,
            JOB_TTL_MS,
            enqueue_ms,
            job_id,
            WAKE_TOKENS_MAX - 1,
            self._inbox_prefix,
            RETRY_KEY_TTL_S,
            expires_ms(request.expires_in),
        ]
        # Safe to repeat: the script does nothing for a job id that is already there.
        deadline = time.monotonic() + self.reconnect_for
        backoff = Backoff(0.1, 2.0)
        added = 0
        while True:
            try:
                added = await self._run_enqueue(keys, args) or added
                break
            except ResponseError as exc:
                if refused_for_memory(exc):  # refused whole: the script's first write
                    raise RedisFull(
                        f"Redis is full (maxmemory reached): job {job_id} was not queued; "
                        "enqueue it again once there is room"
                    ) from exc
                raise
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                # Not replicated: the master took it (its reply comes to our list) and
                # WAIT has already waited; try again at once, on the master of the moment.
                replicating = isinstance(exc, NotReplicated)
                added = 1 if replicating else added
                pause = 0.05 if replicating else backoff.next()
                if time.monotonic() + pause > deadline:
                    raise
                await asyncio.sleep(pause)
        if added:
            self.inbox.expect(job_id)
        return JobHandle(self, job_id)

    async def _run_enqueue(self, keys: list[str], args: list[bytes | str | int]) -> int:
        if not self.handover:
            return await self._run_plain_enqueue(keys, args)
        if self.wait_for_replicas <= 0:
            added: int = await self._enqueue_script(keys=keys, args=args)
            return added
        # One connection for both: WAIT counts the replicas that have this client's writes.
        async with self.redis.pipeline(transaction=False) as pipe:
            await self._enqueue_script(keys=keys, args=args, client=pipe)
            wait_ms = max(1, int(self.replica_timeout * 1000))  # WAIT n 0 would block for ever
            pipe.execute_command("WAIT", self.wait_for_replicas, wait_ms)
            added, replicas = await pipe.execute()
        if int(replicas) < self.wait_for_replicas:
            raise NotReplicated(
                f"enqueue confirmed by {replicas} of {self.wait_for_replicas} replicas"
                f" within {self.replica_timeout}s"
            )
        return int(added)

    async def _run_plain_enqueue(self, keys: list[str], args: list[bytes | str | int]) -> int:
        """Producer mode: the script's first path in plain commands (same KEYS and ARGV;
        the idle set, inbox prefix and try-counter TTL go unused)."""
        job, result, queue, wake = keys[0], keys[1], keys[2], keys[3]
        blob, ttl_ms, score, job_id, wake_end = args[0], args[1], args[2], args[3], args[4]
        expires_ms = args[7]
        commands: list[tuple[Any, ...]] = []
        if not await self.redis.exists(job, result):  # else a repeat: queued or answered
            commands += [
                ("MULTI",),
                ("SET", job, blob, "NX", "PX", ttl_ms),
                ("ZADD", queue, "NX", score, job_id),
                ("LPUSH", wake, "1"),
                ("LTRIM", wake, 0, wake_end),
            ]
            if expires_ms:  # its time to live, on Redis' clock, is the deadline
                commands.append(("SET", deadline_key(str(job_id)), "1", "NX", "PX", expires_ms))
            commands.append(("EXEC",))
        if self.wait_for_replicas > 0:
            # On the same connection: WAIT counts the replicas that have its writes (a
            # repeat after NotReplicated waits again, as the script path does).
            wait_ms = max(1, int(self.replica_timeout * 1000))  # WAIT n 0 would block for ever
            commands.append(("WAIT", self.wait_for_replicas, wait_ms))
        if not commands:
            return 0
        replies = await self._send_raw(commands)
        exec_reply = next((r for r in replies if isinstance(r, list)), None)
        stored = exec_reply is not None and exec_reply[0] is not None  # SET NX: None if it was
        if self.wait_for_replicas > 0 and int(replies[-1]) < self.wait_for_replicas:
            raise NotReplicated(
                f"enqueue confirmed by {replies[-1]} of {self.wait_for_replicas} replicas"
                f" within {self.replica_timeout}s"
            )
        return 1 if stored else 0

    async def _send_raw(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` in one write on one connection and read every reply, raw."""
        pool = self.redis.connection_pool
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command(conn.pack_commands(commands))
            replies: list[Any] = []
            error: Exception | None = None
            for _ in commands:
                try:
                    replies.append(await conn.read_response())
                except ResponseError as exc:  # read them all, so the connection stays usable
                    replies.append(exc)
                    error = error or exc
        except BaseException:
            await conn.disconnect()  # replies may be left unread: never reuse it
            raise
        finally:
            await pool.release(conn)
        for reply in replies:  # EXEC's reply holds the errors of the commands inside
            inner = reply if isinstance(reply, list) else []
            error = error or next((r for r in inner if isinstance(r, ResponseError)), None)
        if error is not None:
            raise error
        return replies

    async def cancel(self, job_id: str) -> bool:
        """Ask for a job to stop: True when it was queued or running (it then ends
        ``cancelled``: a queued one is never run, a running one stops within about a
        second, its model call abandoned), False when it had finished (its result
        stays) or is unknown. Plain commands only, so producer mode may cancel too."""
        result, job = result_key(job_id), job_key(job_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(result)
                    if await pipe.exists(result) or not await pipe.exists(job):
                        await pipe.reset()  # type: ignore[no-untyped-call]
                        return False
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.set(cancel_key(job_id), "1", ex=CANCEL_TTL_S)
                    pipe.publish(CANCEL_CHANNEL, job_id)
                    await pipe.execute()
                    return True
                except WatchError:  # its result came meanwhile: look again
                    continue

    async def wait(self, job_id: str, *, timeout: float | None = 120.0) -> RouteResult:
        """Wait for a job's result; ``TimeoutError`` when it does not come in time."""
        return await self.inbox.wait(job_id, timeout)

    async def route(
        self,
        messages: MessagesLike,
        *,
        schema: dict[str, Any] | None = None,
        context: str | None = None,
        chain: str | None = None,
        metadata: dict[str, Any] | None = None,
        timeout: float | None = 120.0,
        expires_in: float | Unset | None = UNSET,
        cache_ttl: int | None = None,
    ) -> RouteResult:
        """Enqueue and wait; raise :class:`RouteFailed` unless a model answered.

        The job expires when this call stops waiting (``expires_in`` = ``timeout``)
        unless ``expires_in`` says otherwise (None: never), so that nobody answers, and
        pays for, a request whose caller has gone. ``cache_ttl``: as for :meth:`enqueue`.
        """
        if isinstance(expires_in, Unset):
            expires_in = timeout
        handle = await self.enqueue(
            messages,
            schema=schema,
            context=context,
            chain=chain,
            metadata=metadata,
            expires_in=expires_in,
            cache_ttl=cache_ttl,
        )
        return await handle.result(timeout=timeout)
