"""Per model x outcome counters shared through Redis, and the per-job metrics event."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import pytest
from redis.asyncio import Redis

from llm_router.client.keys import METRICS_CHANNEL, METRICS_COUNTERS_KEY, METRICS_PENDING_KEY
from llm_router.client.protocol import Attempt, Outcome, RouteResult
from llm_router.worker.jobs import Finished
from llm_router.worker.lanes import Lanes
from llm_router.worker.metrics import Metrics, counter_fields, event_payload
from llm_router.worker.queue import Claimed, RedisQueue
from tests.unit.blobs import NO_USAGE

A, B, C = "ollama_chat/qwen", "anthropic/haiku", "anthropic/sonnet"


def _result(
    *outcomes: tuple[str, Outcome], job_id: str | None = "job-1", context: str | None = "ctx"
) -> RouteResult:
    attempts = [
        Attempt(
            model=model,
            outcome=outcome,
            reason=None if outcome == "success" else "nope",
            latency_ms=10 * (i + 1),
        )
        for i, (model, outcome) in enumerate(outcomes)
    ]
    ok = bool(attempts) and attempts[-1].outcome == "success"
    return RouteResult(
        status="ok" if ok else "failed",
        content="x" if ok else None,
        model_used=attempts[-1].model if ok else "none",
        attempts=attempts,
        latency_ms=sum(a.latency_ms for a in attempts),
        job_id=job_id,
        context=context,
        chain="default",
    )


@pytest.fixture
async def second_redis(fake_server: fakeredis.FakeServer) -> AsyncIterator[Redis]:
    """Another connection to the same server: a second worker."""
    client: Redis = fakeredis.FakeAsyncRedis(server=fake_server)
    yield client
    await client.aclose()


def test_counter_fields_first_model_success() -> None:
    assert counter_fields(_result((A, "success"))) == [(A, "success")]


def test_counter_fields_fallback_then_success() -> None:
    result = _result((A, "rejected"), (B, "invalid"), (C, "success"))
    assert counter_fields(result) == [(A, "fallback"), (B, "fallback"), (C, "success")]


def test_counter_fields_last_failure_is_error() -> None:
    result = _result((A, "rejected"), (B, "invalid"), (C, "rejected"))
    assert counter_fields(result) == [(A, "fallback"), (B, "fallback"), (C, "error")]
    assert counter_fields(_result((C, "invalid"))) == [(C, "error")]


def test_counter_fields_invalid_request_counts_nothing() -> None:
    assert counter_fields(RouteResult(status="invalid_request", error="bad")) == []


async def test_in_memory_counters_like_the_seed() -> None:
    metrics = Metrics()
    first = await metrics.record(_result((A, "rejected"), (B, "success")))
    second = await metrics.record(_result((A, "success"), job_id="job-2"))
    assert first is not None
    assert second is not None
    assert first["metrics_snapshot"] == {
        A: {"success": 0, "fallback": 1, "error": 0, "skipped": 0},
        B: {"success": 1, "fallback": 0, "error": 0, "skipped": 0},
    }
    assert second["metrics_snapshot"][A] == {"success": 1, "fallback": 1, "error": 0, "skipped": 0}
    assert await metrics.snapshot() == second["metrics_snapshot"]


async def test_counters_accumulate_across_two_workers(redis: Redis, second_redis: Redis) -> None:
    worker1, worker2 = Metrics(redis), Metrics(second_redis)
    await worker1.record(_result((A, "rejected"), (B, "success"), job_id="j1"))
    event = await worker2.record(_result((A, "success"), job_id="j2"))
    assert event is not None
    expected = {
        A: {"success": 1, "fallback": 1, "error": 0, "skipped": 0},
        B: {"success": 1, "fallback": 0, "error": 0, "skipped": 0},
    }
    assert event["metrics_snapshot"] == expected
    assert await worker1.snapshot() == expected
    assert await worker2.snapshot() == expected
    raw = await redis.hgetall(METRICS_COUNTERS_KEY)  # type: ignore[misc]
    assert {k.decode(): int(v) for k, v in raw.items()} == {
        f"{A}|fallback": 1,
        f"{B}|success": 1,
        f"{A}|success": 1,
    }


async def test_same_job_counted_once(redis: Redis, second_redis: Redis) -> None:
    result = _result((A, "rejected"), (B, "success"), job_id="dup")
    first = await Metrics(redis).record(result)
    again = await Metrics(second_redis).record(result)
    assert first is not None
    assert again is not None
    assert again["metrics_snapshot"] == first["metrics_snapshot"]
    assert again["metrics_snapshot"][A]["fallback"] == 1
    assert again["metrics_snapshot"][B]["success"] == 1


async def test_results_without_job_id_are_each_counted(redis: Redis) -> None:
    metrics = Metrics(redis)
    await metrics.record(_result((A, "success"), job_id=None))
    await metrics.record(_result((A, "success"), job_id=None))
    assert (await metrics.snapshot())[A]["success"] == 2


async def test_model_names_with_separator_survive(redis: Redis) -> None:
    odd = "custom/with|pipe"
    metrics = Metrics(redis)
    event = await metrics.record(_result((odd, "success")))
    assert event is not None
    assert event["metrics_snapshot"] == {
        odd: {"success": 1, "fallback": 0, "error": 0, "skipped": 0}
    }


async def test_event_payload_fields(redis: Redis) -> None:
    result = _result((A, "rejected"), (B, "success"), job_id="j7", context="svc.reconcile")
    event = await Metrics(redis).record(result)
    assert event is not None
    assert event["job_id"] == "j7"
    assert event["context"] == "svc.reconcile"
    assert event["chain"] == "default"
    assert event["status"] == "ok"
    assert event["model_used"] == B
    assert event["latency_ms"] == result.latency_ms
    assert event["attempts"] == [
        {
            "model": A,
            "outcome": "rejected",
            "reason": "nope",
            "latency_ms": 10,
            "load_ms": None,
            "retries": 0,
            "retry_error": None,
            **NO_USAGE,
        },
        {
            "model": B,
            "outcome": "success",
            "reason": None,
            "latency_ms": 20,
            "load_ms": None,
            "retries": 0,
            "retry_error": None,
            **NO_USAGE,
        },
    ]
    assert isinstance(event["timestamp"], float)
    assert event["timestamp"] > 1_600_000_000
    assert set(event["metrics_snapshot"]) == {A, B}


def test_event_payload_for_total_failure() -> None:
    result = _result((A, "rejected"), (B, "rejected"))
    event = event_payload(result, {})
    assert event["model_used"] == "none"
    assert event["status"] == "failed"
    assert len(event["attempts"]) == 2
    assert event["metrics_snapshot"] == {}


async def _subscribe(redis: Redis, channel: str) -> Any:
    pubsub = redis.pubsub()
    await pubsub.subscribe(channel)
    confirm = await pubsub.get_message(timeout=1.0)
    assert confirm is not None
    assert confirm["type"] == "subscribe"
    return pubsub


async def test_subscriber_receives_json_event(redis: Redis, second_redis: Redis) -> None:
    pubsub = await _subscribe(second_redis, METRICS_CHANNEL)
    try:
        event = await Metrics(redis).record(_result((A, "success"), job_id="pub-1"))
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
    finally:
        await pubsub.aclose()
    assert message is not None
    assert message["channel"] == METRICS_CHANNEL.encode()
    received = json.loads(message["data"])
    assert received == event
    assert received["job_id"] == "pub-1"
    assert received["metrics_snapshot"][A]["success"] == 1


async def test_failure_event_is_published_too(redis: Redis) -> None:
    pubsub = await _subscribe(redis, METRICS_CHANNEL)
    try:
        await Metrics(redis).record(_result((A, "rejected"), (B, "invalid"), job_id="f-1"))
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
    finally:
        await pubsub.aclose()
    assert message is not None
    received = json.loads(message["data"])
    assert received["model_used"] == "none"
    assert received["metrics_snapshot"][B]["error"] == 1


async def test_custom_channel(redis: Redis) -> None:
    pubsub = await _subscribe(redis, "other_channel")
    try:
        await Metrics(redis, channel="other_channel").record(_result((A, "success")))
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
    finally:
        await pubsub.aclose()
    assert message is not None
    assert json.loads(message["data"])["model_used"] == A


async def test_broken_redis_record_returns_none(broken_redis: Redis) -> None:
    metrics = Metrics(broken_redis)
    assert await metrics.record(_result((A, "success"))) is None
    assert await metrics.record(_result((A, "rejected"), (B, "rejected"))) is None


async def test_a_result_stored_but_never_counted_is_swept_once(
    redis: Redis, second_redis: Redis
) -> None:
    """A worker killed between storing a result and counting it: another counts it."""
    result = _result((A, "rejected"), (B, "success"), job_id="swept-1")
    queue = RedisQueue(redis, Lanes("q-sweep", None, max_jobs=1, batch_max_jobs=None,
                                    keep_result_s=60, batch_keep_result_s=60),
                       token="dead", lease_ms=10_000)  # fmt: skip
    job = Claimed("swept-1", queue.lanes.interactive, 1, b"{}", 1)
    blob = Finished(result, True, function="route").blob(job, started_ms=1)
    await redis.set("arq:in-progress:swept-1", "dead")
    assert await queue.finish(job, blob, None, announce=True)
    # ... and the worker died here: nothing counted, nothing announced.
    pubsub: Any = second_redis.pubsub()
    await pubsub.subscribe(METRICS_CHANNEL)
    await pubsub.get_message(timeout=1.0)
    other = Metrics(second_redis)
    assert await other.sweep(older_than_s=60) == 0  # too recent: its worker may still do it
    assert await other.sweep(older_than_s=0) == 1
    assert await other.sweep(older_than_s=0) == 0  # once
    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
    again = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
    await pubsub.aclose()
    assert message is not None
    assert json.loads(message["data"])["job_id"] == "swept-1"
    assert again is None
    counters = await redis.hgetall(METRICS_COUNTERS_KEY)  # type: ignore[misc]
    assert counters == {f"{A}|fallback".encode(): b"1", f"{B}|success".encode(): b"1"}
    assert await redis.zcard(METRICS_PENDING_KEY) == 0
    # The worker that stored it, had it lived: counted already, so nothing twice.
    assert await Metrics(redis).record(result) is not None
    assert await redis.hget(METRICS_COUNTERS_KEY, f"{B}|success") == b"1"  # type: ignore[misc]


async def test_a_pending_job_whose_result_expired_is_dropped(redis: Redis) -> None:
    await redis.zadd(METRICS_PENDING_KEY, {"gone": 1})
    assert await Metrics(redis).sweep(older_than_s=0) == 0
    assert await redis.zcard(METRICS_PENDING_KEY) == 0
