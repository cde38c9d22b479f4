"""The whole way of a request: client -> Redis -> worker process -> stub models -> result."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import pytest
from redis.asyncio import Redis

from llm_router.client import RouteFailed, RouterClient
from llm_router.client.keys import METRICS_CHANNEL, METRICS_COUNTERS_KEY
from llm_router_testing.stubs import StubServer
from tests.integration.conftest import WorkerProcess

pytestmark = pytest.mark.integration

QWEN = "ollama_chat/qwen2.5:7b"
HAIKU = "anthropic/claude-haiku-4-5-20251001"
SONNET = "anthropic/claude-sonnet-4-6"
SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["answer", "ok"],
    "properties": {"answer": {"type": "string"}, "ok": {"type": "boolean"}},
}

# behaviour -> (needs a schema, attempt outcome, text the reason must contain)
REJECTIONS: dict[str, tuple[bool, str, str]] = {
    "refusal": (False, "rejected", "RefusalPattern matched: 'I cannot'"),
    "http_500": (False, "rejected", "InternalServerError"),
    "http_429": (False, "rejected", "RateLimitError"),
    "hang": (False, "rejected", "Timeout after"),
    "invalid_json": (True, "invalid", "JSONDecodeError"),
    "schema_violation": (True, "invalid", "SchemaValidationError"),
}


def marker() -> str:
    return uuid.uuid4().hex


async def test_local_model_answers_first(client: RouterClient, stub: StubServer) -> None:
    tag = marker()
    result = await client.route(
        f"say hi {tag}", context="tests.local", metadata={"row": 17, "batch": "b1"}
    )
    assert result.status == "ok"
    assert result.model_used == QWEN
    assert [a.outcome for a in result.attempts] == ["success"]
    assert tag in result.content
    assert result.raw_text == result.content
    assert result.context == "tests.local"
    assert result.metadata == {"row": 17, "batch": "b1"}
    sent = [r for r in stub.requests if tag in json.dumps(r.body)]
    assert [r.path for r in sent] == ["/api/chat"]
    assert sent[0].body["stream"] is False


@pytest.mark.parametrize("behaviour", sorted(REJECTIONS))
async def test_rejected_local_model_falls_back_to_haiku(
    client: RouterClient, behaviour: str
) -> None:
    needs_schema, outcome, reason = REJECTIONS[behaviour]
    prompt = f"stub:qwen={behaviour} stub:haiku=json {marker()}"
    result = await client.route(prompt, schema=SCHEMA if needs_schema else None)
    assert result.model_used == HAIKU
    first, second = result.attempts
    assert (first.model, first.outcome) == (QWEN, outcome)
    assert first.reason is not None
    assert reason in first.reason
    assert (second.model, second.outcome) == (HAIKU, "success")
    if needs_schema:
        assert result.content == {"answer": "haiku", "ok": True}
    if behaviour == "hang":
        # The worker's own deadline (1 s in this chain), not the provider's.
        assert 950 <= first.latency_ms < 1900


@pytest.mark.parametrize("behaviour", sorted(REJECTIONS))
async def test_second_model_rejected_falls_back_to_sonnet(
    client: RouterClient, behaviour: str
) -> None:
    needs_schema, outcome, reason = REJECTIONS[behaviour]
    prompt = f"stub:qwen=refusal stub:haiku={behaviour} stub:sonnet=json {marker()}"
    result = await client.route(prompt, schema=SCHEMA if needs_schema else None)
    assert result.model_used == SONNET
    assert [(a.model, a.outcome) for a in result.attempts] == [
        (QWEN, "rejected"),
        (HAIKU, outcome),
        (SONNET, "success"),
    ]
    assert reason in (result.attempts[1].reason or "")


async def test_fenced_json_counts_as_json(client: RouterClient) -> None:
    result = await client.route(f"stub:qwen=fenced {marker()}", schema=SCHEMA)
    assert result.model_used == QWEN
    assert result.content == {"answer": "qwen", "ok": True}
    assert "```json" in result.raw_text


@pytest.mark.parametrize("behaviour", sorted(REJECTIONS))
async def test_last_model_rejected_is_total_failure(client: RouterClient, behaviour: str) -> None:
    needs_schema, outcome, reason = REJECTIONS[behaviour]
    prompt = f"stub:qwen=refusal stub:haiku=http_500 stub:sonnet={behaviour} {marker()}"
    with pytest.raises(RouteFailed) as caught:
        await client.route(prompt, schema=SCHEMA if needs_schema else None)
    result = caught.value.result
    assert result.status == "failed"
    assert result.model_used == "none"
    assert result.content is None
    assert [a.model for a in caught.value.attempts] == [QWEN, HAIKU, SONNET]
    assert caught.value.attempts[-1].outcome == outcome
    assert reason in (caught.value.attempts[-1].reason or "")
    assert "all 3 models" in str(caught.value)


async def test_invalid_schema_is_rejected_before_any_model_call(
    client: RouterClient, redis: Redis, stub: StubServer
) -> None:
    tag = marker()
    with pytest.raises(ValueError, match="invalid JSON Schema"):
        await client.enqueue(f"q {tag}", schema={"type": "objekt"})
    # A foreign producer skips the client's check; the worker checks again.
    job_id = await enqueue_raw(
        redis,
        client.queue_name,
        {"messages": [{"role": "user", "content": f"q {tag}"}], "schema": {"type": "objekt"}},
    )
    result = await client.wait(job_id, timeout=20)
    assert result.status == "invalid_request"
    assert result.error is not None
    assert "schema" in result.error
    assert not [r for r in stub.requests if tag in json.dumps(r.body)]


async def test_unknown_chain_is_an_invalid_request(client: RouterClient) -> None:
    handle = await client.enqueue("hello", chain="no-such-chain")
    result = await handle.result(timeout=20, raise_on_failure=False)
    assert result.status == "invalid_request"
    assert result.error is not None
    assert "no-such-chain" in result.error
    assert "default" in result.error


async def test_an_unsupported_protocol_version_gets_its_own_error(
    redis: Redis, queue_name: str, client: RouterClient
) -> None:
    request = {"v": 999, "messages": [{"role": "user", "content": "hi"}], "new_field": True}
    job_id = await enqueue_raw(redis, queue_name, request)
    result = await client.wait(job_id, timeout=20)
    assert result.status == "invalid_request"
    assert result.error == "unsupported protocol version 999 (supported: 1, 2, 3)"


async def test_named_chain_is_used(client: RouterClient) -> None:
    with pytest.raises(RouteFailed) as caught:
        await client.route(f"stub:qwen=refusal {marker()}", chain="local_only")
    assert [a.model for a in caught.value.attempts] == [QWEN]


async def test_what_reaches_the_providers(client: RouterClient, stub: StubServer) -> None:
    tag = marker()
    await client.route(f"stub:qwen=http_500 stub:haiku=json {tag}", schema=SCHEMA)
    sent = [r for r in stub.requests if tag in json.dumps(r.body)]
    ollama, anthropic = sent
    assert ollama.path == "/api/chat"
    assert ollama.body["format"] == SCHEMA  # constrained decoding on the local model
    assert anthropic.path == "/v1/messages"
    assert anthropic.body["max_tokens"] == 4096  # not litellm's 64,000
    assert anthropic.headers["x-api-key"] == "sk-ant-test-secret-0123456789"
    # The local model is registered with litellm: no blocking /api/show per call.
    assert not [r for r in stub.requests if r.path == "/api/show"]


async def test_metrics_event_as_a_subscriber_receives_it(
    client: RouterClient, redis: Redis
) -> None:
    before: dict[bytes, bytes] = await redis.hgetall(METRICS_COUNTERS_KEY)  # type: ignore[misc]
    pubsub = redis.pubsub()
    await pubsub.subscribe(METRICS_CHANNEL)
    try:
        handle = await client.enqueue(
            f"stub:qwen=refusal stub:haiku=text {marker()}", context="tests.metrics"
        )
        await handle.result(timeout=20)
        event = await next_event(pubsub, handle.job_id)
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    assert event["job_id"] == handle.job_id
    assert event["context"] == "tests.metrics"
    assert event["model_used"] == HAIKU
    assert isinstance(event["latency_ms"], int)
    assert [(a["model"], a["outcome"]) for a in event["attempts"]] == [
        (QWEN, "rejected"),
        (HAIKU, "success"),
    ]
    assert set(event["attempts"][0]) == {
        "model", "outcome", "reason", "latency_ms", "load_ms", "retries", "retry_error",
        "input_tokens", "output_tokens", "cache_read_input_tokens",
        "cache_creation_input_tokens", "cost_usd", "finish_reason", "deployment",
        "batch_id",
    }  # fmt: skip
    assert set(event["breakers"].values()) == {"closed"}
    assert QWEN in event["breakers"]
    assert isinstance(event["timestamp"], float)
    snapshot = event["metrics_snapshot"]
    after: dict[bytes, bytes] = await redis.hgetall(METRICS_COUNTERS_KEY)  # type: ignore[misc]

    def delta(field: str) -> int:
        return int(after.get(field.encode(), 0)) - int(before.get(field.encode(), 0))

    assert delta(f"{QWEN}|fallback") >= 1
    assert delta(f"{HAIKU}|success") >= 1
    assert snapshot[QWEN]["fallback"] >= 1
    assert snapshot[HAIKU]["success"] >= 1


async def test_total_failure_publishes_an_event_too(client: RouterClient, redis: Redis) -> None:
    pubsub = redis.pubsub()
    await pubsub.subscribe(METRICS_CHANNEL)
    try:
        handle = await client.enqueue(f"stub:*=refusal {marker()}")
        result = await handle.result(timeout=20, raise_on_failure=False)
        event = await next_event(pubsub, handle.job_id)
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    assert result.status == "failed"
    assert event["model_used"] == "none"
    assert event["status"] == "failed"
    assert [a["outcome"] for a in event["attempts"]] == ["rejected"] * 3
    assert event["metrics_snapshot"][SONNET]["error"] >= 1


async def test_logs_carry_context_but_no_prompt_or_secret(
    client: RouterClient, worker: WorkerProcess
) -> None:
    secret_prompt = f"my-private-prompt-{marker()}"
    result = await client.route(f"stub:qwen=refusal {secret_prompt}", context="tests.logs")
    await asyncio.sleep(0.2)
    text = worker.log_text()
    assert secret_prompt not in text
    assert "sk-ant-test-secret" not in text
    lines = [r for r in worker.log_records() if r.get("job_id") == result.job_id]
    attempts = [r for r in lines if r["event"] == "attempt"]
    assert [(r["model"], r["outcome"]) for r in attempts] == [
        (QWEN, "rejected"),
        (HAIKU, "success"),
    ]
    assert all(r["context"] == "tests.logs" and "latency_ms" in r for r in attempts)
    assert [r["status"] for r in lines if r["event"] == "routed"] == ["ok"]


async def enqueue_raw(redis: Redis, queue: str, request: Any, function: str = "route") -> str:
    """Enqueue the way a producer in another language would: two plain commands."""
    job_id = marker()
    now = int(time.time() * 1000)
    blob = json.dumps({"t": 1, "f": function, "a": [request], "k": {}, "et": now})
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(f"arq:job:{job_id}", blob, px=86_400_000)
        pipe.zadd(queue, {job_id: now})
        await pipe.execute()
    return job_id


async def next_event(pubsub: Any, job_id: str, timeout: float = 10.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is None:
                continue
            event: dict[str, Any] = json.loads(message["data"])
            if event.get("job_id") == job_id:
                return event
