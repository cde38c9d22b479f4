"""The producer side against fakeredis: enqueue, wait, the handle and its failures."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from pydantic import ValidationError
from redis.asyncio import Redis

from llm_router.client.client import JobHandle, RouteFailed, RouterClient, build_request
from llm_router.client.keys import (
    DEFAULT_QUEUE,
    REPLY_PREFIX,
    idle_key,
    inbox_key,
    job_key,
    result_key,
    wake_key,
)
from llm_router.client.protocol import (
    JOB_TTL_MS,
    WAKE_TOKENS_MAX,
    Attempt,
    RouteRequest,
    RouteResult,
)
from tests.unit.blobs import result_blob

SCHEMA: dict[str, Any] = {"type": "object", "required": ["a"]}


def _failed(job_id: str) -> RouteResult:
    return RouteResult(
        status="failed",
        attempts=[
            Attempt(model="m1", outcome="rejected", reason="Timeout after 8.0s", latency_ms=8000),
            Attempt(model="m2", outcome="invalid", reason="JSONDecodeError: x", latency_ms=5),
        ],
        error="all 2 models in chain 'default' failed",
        job_id=job_id,
    )


async def _write_later(redis: Redis, job_id: str, result: RouteResult, delay: float) -> None:
    await asyncio.sleep(delay)
    await redis.set(result_key(job_id), result_blob(result, job_id))


@pytest.fixture
def client(redis: Redis) -> RouterClient:
    # Tests that write only the result key (a worker that does not push) rely on the sweep.
    return RouterClient(redis=redis, fallback_poll=0.05)


# --- build_request ---------------------------------------------------------------------------


def test_build_request_bare_string_is_one_user_message() -> None:
    request = build_request("What is 2+2?")
    assert len(request.messages) == 1
    assert request.messages[0].role == "user"
    assert request.messages[0].content == "What is 2+2?"
    assert request.chain is None  # the worker picks the lane's chain


def test_build_request_passes_every_field() -> None:
    request = build_request(
        [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
        schema=SCHEMA,
        context="svc",
        chain="cheap",
        metadata={"ticket": 7},
    )
    assert [m.role for m in request.messages] == ["system", "user"]
    assert request.json_schema == SCHEMA
    assert request.context == "svc"
    assert request.chain == "cheap"
    assert request.metadata == {"ticket": 7}


def test_build_request_validates() -> None:
    with pytest.raises(ValidationError):
        build_request([])
    with pytest.raises(ValidationError):
        build_request("x", schema={"type": "objekt"})


# --- enqueue ---------------------------------------------------------------------------------


async def test_enqueue_writes_job_blob_and_queue_entry(client: RouterClient, redis: Redis) -> None:
    before = int(time.time() * 1000)
    handle = await client.enqueue("hello", schema=SCHEMA, context="ctx", job_id="job-1")
    assert isinstance(handle, JobHandle)
    assert handle.job_id == "job-1"
    raw = await redis.get(job_key("job-1"))
    assert raw is not None
    blob = json.loads(raw)
    assert set(blob) == {"t", "f", "a", "k", "et"}
    assert blob["f"] == "route"
    assert blob["k"] == {"reply_to": client.inbox.key}
    assert client.inbox.key.startswith(REPLY_PREFIX)
    assert await redis.lrange(wake_key(DEFAULT_QUEUE), 0, -1) == [b"1"]  # type: ignore[misc]
    request = RouteRequest.model_validate(blob["a"][0])
    assert request.messages[0].content == "hello"
    assert request.json_schema == SCHEMA
    assert request.context == "ctx"
    queue = await redis.zrange(DEFAULT_QUEUE, 0, -1, withscores=True)
    assert queue == [(b"job-1", float(blob["et"]))]
    assert blob["et"] >= before
    ttl = await redis.pttl(job_key("job-1"))
    assert 0 < ttl <= JOB_TTL_MS


async def test_enqueue_generates_distinct_job_ids(client: RouterClient, redis: Redis) -> None:
    first = await client.enqueue("a")
    second = await client.enqueue("b")
    assert first.job_id != second.job_id
    assert await redis.zcard(DEFAULT_QUEUE) == 2


async def test_enqueue_same_job_id_twice_is_queued_once(client: RouterClient, redis: Redis) -> None:
    await client.enqueue("first", job_id="dup")
    await client.enqueue("second", job_id="dup")
    assert await redis.zrange(DEFAULT_QUEUE, 0, -1) == [b"dup"]
    raw = await redis.get(job_key("dup"))
    assert raw is not None
    assert json.loads(raw)["a"][0]["messages"][0]["content"] == "first"


async def test_enqueue_after_result_exists_is_not_queued(
    client: RouterClient, redis: Redis
) -> None:
    await redis.set(result_key("done"), result_blob(RouteResult(status="ok"), "done"))
    await client.enqueue("again", job_id="done")
    assert await redis.zcard(DEFAULT_QUEUE) == 0
    assert await redis.exists(job_key("done")) == 0


async def test_enqueue_uses_the_queue_name(redis: Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    await RouterClient(redis=redis, queue_name="q-arg").enqueue("x", job_id="j1")
    monkeypatch.setenv("LLM_ROUTER_QUEUE_NAME", "q-env")
    env_client = RouterClient(redis=redis)
    assert env_client.queue_name == "q-env"
    await env_client.enqueue("x", job_id="j2")
    assert await redis.zrange("q-arg", 0, -1) == [b"j1"]
    assert await redis.zrange("q-env", 0, -1) == [b"j2"]
    assert await redis.zcard(DEFAULT_QUEUE) == 0


async def test_invalid_request_writes_nothing(client: RouterClient, redis: Redis) -> None:
    with pytest.raises(ValidationError):
        await client.enqueue([{"role": "robot", "content": "x"}], job_id="bad")
    with pytest.raises(ValidationError):
        await client.enqueue("x", schema={"type": "objekt"}, job_id="bad")
    with pytest.raises(ValidationError):
        await client.enqueue("x", context="c" * 201, job_id="bad")
    assert await redis.zcard(DEFAULT_QUEUE) == 0
    assert await redis.keys("*") == []


# --- wait and the handle ---------------------------------------------------------------------


async def test_wait_returns_result_written_concurrently(client: RouterClient, redis: Redis) -> None:
    expected = RouteResult(status="ok", content="hi", model_used="m1", job_id="w1")
    writer = asyncio.create_task(_write_later(redis, "w1", expected, 0.03))
    result = await client.wait("w1", timeout=2.0)
    await writer
    assert result == expected


async def test_wait_returns_existing_result_immediately(client: RouterClient, redis: Redis) -> None:
    await redis.set(result_key("w0"), result_blob(RouteResult(status="ok", content=1), "w0"))
    result = await client.wait("w0", timeout=0)
    assert result.content == 1


async def test_wait_times_out(client: RouterClient) -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="never"):
        await client.wait("never", timeout=0.05)
    elapsed = time.monotonic() - start
    assert elapsed < 1.0


async def test_handle_result_raises_route_failed(client: RouterClient, redis: Redis) -> None:
    handle = await client.enqueue("x", job_id="f1")
    await redis.set(result_key("f1"), result_blob(_failed("f1"), "f1"))
    with pytest.raises(RouteFailed) as info:
        await handle.result(timeout=1.0)
    assert info.value.result.status == "failed"
    assert [a.model for a in info.value.attempts] == ["m1", "m2"]
    message = str(info.value)
    assert "Timeout after 8.0s" in message
    assert "failed" in message


async def test_handle_result_without_raising(client: RouterClient, redis: Redis) -> None:
    handle = await client.enqueue("x", job_id="f2")
    await redis.set(result_key("f2"), result_blob(_failed("f2"), "f2"))
    result = await handle.result(timeout=1.0, raise_on_failure=False)
    assert result.status == "failed"
    assert not result.ok
    assert result.model_used == "none"
    assert len(result.attempts) == 2


async def test_handle_result_raises_for_invalid_request(client: RouterClient, redis: Redis) -> None:
    handle = await client.enqueue("x", job_id="i1")
    invalid = RouteResult(status="invalid_request", error="unknown chain 'x'", job_id="i1")
    await redis.set(result_key("i1"), result_blob(invalid, "i1"))
    with pytest.raises(RouteFailed, match="unknown chain"):
        await handle.result(timeout=1.0)


async def test_handle_result_timeout(client: RouterClient) -> None:
    handle = await client.enqueue("x", job_id="slow")
    with pytest.raises(TimeoutError):
        await handle.result(timeout=0.02)


async def _fake_worker(redis: Redis, result: RouteResult) -> str:
    """Claim the one queued job and answer it, as a worker would."""
    for _ in range(200):
        ids = await redis.zrange(DEFAULT_QUEUE, 0, 0)
        if ids:
            job_id: str = ids[0].decode()
            raw = await redis.get(job_key(job_id))
            assert raw is not None
            RouteRequest.model_validate(json.loads(raw)["a"][0])
            answer = result.model_copy(update={"job_id": job_id})
            await redis.set(result_key(job_id), result_blob(answer, job_id))
            return job_id
        await asyncio.sleep(0.005)
    raise AssertionError("no job was queued")


async def test_route_enqueues_and_waits(client: RouterClient, redis: Redis) -> None:
    worker = asyncio.create_task(
        _fake_worker(redis, RouteResult(status="ok", content={"a": 1}, model_used="m"))
    )
    result = await client.route("hello", schema=SCHEMA, timeout=2.0)
    job_id = await worker
    assert result.ok
    assert result.content == {"a": 1}
    assert result.job_id == job_id


async def test_route_raises_route_failed(client: RouterClient, redis: Redis) -> None:
    worker = asyncio.create_task(_fake_worker(redis, _failed("?")))
    with pytest.raises(RouteFailed) as info:
        await client.route("hello", timeout=2.0)
    await worker
    assert len(info.value.attempts) == 2


async def test_client_does_not_close_a_redis_it_was_given(redis: Redis) -> None:
    async with RouterClient(redis=redis) as client:
        await client.enqueue("x", job_id="c1")
    assert await redis.exists(job_key("c1")) == 1


def test_route_failed_without_attempts_uses_error() -> None:
    exc = RouteFailed(RouteResult(status="invalid_request", error="bad request"))
    assert str(exc) == "invalid_request: bad request"
    assert exc.attempts == []


# --- the pushed reply and its safety nets --------------------------------------------------


async def test_wake_up_list_is_capped(client: RouterClient, redis: Redis) -> None:
    for n in range(WAKE_TOKENS_MAX + 20):
        await client.enqueue("hi", job_id=f"cap-{n}")
    assert await redis.llen(wake_key(DEFAULT_QUEUE)) == WAKE_TOKENS_MAX  # type: ignore[misc]
    assert await redis.zcard(DEFAULT_QUEUE) == WAKE_TOKENS_MAX + 20


async def test_pushed_reply_reaches_the_waiting_call(client: RouterClient, redis: Redis) -> None:
    handle = await client.enqueue("hi", job_id="push-1")

    async def worker_pushes() -> None:
        await asyncio.sleep(0.05)
        blob = result_blob(RouteResult(status="ok", content="pushed", job_id="push-1"), "push-1")
        await redis.lpush(client.inbox.key, blob)  # type: ignore[misc]

    pusher = asyncio.create_task(worker_pushes())
    result = await handle.result(timeout=5)
    await pusher
    assert result.content == "pushed"
    assert await redis.get(result_key("push-1")) is None  # it came by push, not by the key


async def test_reply_that_arrives_before_the_wait_is_kept(
    client: RouterClient, redis: Redis
) -> None:
    first = await client.enqueue("a", job_id="early-1")
    second = await client.enqueue("b", job_id="early-2")
    for job_id in ("early-2", "early-1"):
        blob = result_blob(RouteResult(status="ok", content=job_id, job_id=job_id), job_id)
        await redis.lpush(client.inbox.key, blob)  # type: ignore[misc]
    assert (await second.result(timeout=5)).content == "early-2"
    # The reader took early-1's reply too; it is kept for the later wait.
    assert (await first.result(timeout=0.01)).content == "early-1"


async def test_many_waits_share_one_reader(client: RouterClient, redis: Redis) -> None:
    handles = [await client.enqueue("x", job_id=f"many-{n}") for n in range(50)]
    waits = [asyncio.create_task(h.result(timeout=5)) for h in handles]
    await asyncio.sleep(0.01)
    for n in reversed(range(50)):
        r = RouteResult(status="ok", content=n, job_id=f"many-{n}")
        await redis.lpush(client.inbox.key, result_blob(r, f"many-{n}"))  # type: ignore[misc]
    results = await asyncio.gather(*waits)
    assert [r.content for r in results] == list(range(50))


async def test_result_key_without_push_is_found_by_the_sweep(redis: Redis) -> None:
    client = RouterClient(redis=redis, fallback_poll=0.2)
    handle = await client.enqueue("x", job_id="sweep-1")

    async def foreign_worker() -> None:
        await asyncio.sleep(0.1)
        blob = result_blob(RouteResult(status="ok", content="by key", job_id="sweep-1"), "sweep-1")
        await redis.set(result_key("sweep-1"), blob)

    writer = asyncio.create_task(foreign_worker())
    started = time.monotonic()
    result = await handle.result(timeout=10)
    await writer
    assert result.content == "by key"
    assert time.monotonic() - started < 3  # the sweep, not the 10 s timeout
    await client.aclose()


async def test_wait_looks_at_the_key_once_more_before_timing_out(redis: Redis) -> None:
    client = RouterClient(redis=redis, fallback_poll=60)
    await client.enqueue("x", job_id="late-1")

    async def late_writer() -> None:
        await asyncio.sleep(0.2)
        blob = result_blob(RouteResult(status="ok", content="late", job_id="late-1"), "late-1")
        await redis.set(result_key("late-1"), blob)

    writer = asyncio.create_task(late_writer())
    result = await client.wait("late-1", timeout=0.4)
    await writer
    assert result.content == "late"
    await client.aclose()


async def test_wait_times_out_no_earlier_than_asked(client: RouterClient) -> None:
    await client.enqueue("x", job_id="never-1")
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="never-1"):
        await client.wait("never-1", timeout=0.3)
    assert time.monotonic() - started >= 0.3


async def test_wait_for_a_job_of_another_producer_reads_its_key(
    client: RouterClient, redis: Redis
) -> None:
    blob = result_blob(RouteResult(status="ok", content="theirs", job_id="other-1"), "other-1")
    await redis.set(result_key("other-1"), blob)
    result = await client.wait("other-1", timeout=1)
    assert result.content == "theirs"


async def test_a_waiting_worker_is_handed_the_job_at_enqueue(
    client: RouterClient, redis: Redis
) -> None:
    now_ms = int(time.time() * 1000)
    await redis.zadd(idle_key(DEFAULT_QUEUE), {"tok1|10000": now_ms + 5000})
    await client.enqueue("hi", job_id="hand-1")
    inbox = await redis.lrange(inbox_key(DEFAULT_QUEUE, "tok1"), 0, -1)  # type: ignore[misc]
    assert len(inbox) == 1
    job_id, tries, score, blob = inbox[0].split(b" ", 3)
    assert (job_id, tries) == (b"hand-1", b"1")
    assert json.loads(blob) == json.loads(await redis.get(job_key("hand-1")))
    assert int(score) == await redis.zscore(DEFAULT_QUEUE, "hand-1")  # still queued (recovery)
    assert await redis.get("arq:in-progress:hand-1") == b"tok1"
    assert 0 < await redis.pttl("arq:in-progress:hand-1") <= 10_000
    assert await redis.zcard(idle_key(DEFAULT_QUEUE)) == 0  # the offer is used up
    assert await redis.llen(wake_key(DEFAULT_QUEUE)) == 0  # type: ignore[misc]
    # The next job finds no waiting worker: it wakes one instead.
    await client.enqueue("hi", job_id="hand-2")
    assert await redis.llen(wake_key(DEFAULT_QUEUE)) == 1  # type: ignore[misc]


async def test_an_expired_offer_is_not_used(client: RouterClient, redis: Redis) -> None:
    now_ms = int(time.time() * 1000)
    await redis.zadd(idle_key(DEFAULT_QUEUE), {"dead|10000": now_ms - 1000})
    await client.enqueue("hi", job_id="hand-3")
    assert await redis.exists(inbox_key(DEFAULT_QUEUE, "dead")) == 0
    assert await redis.get("arq:in-progress:hand-3") is None
    assert await redis.llen(wake_key(DEFAULT_QUEUE)) == 1  # type: ignore[misc]
