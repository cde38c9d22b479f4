"""Only whole answers pass, through a real worker and stubs that fail as the services do.

A cut-off answer (Ollama's ``done_reason: "length"``, Anthropic's ``max_tokens``) and
Anthropic's HTTP-200 refusal fall through to the next model; an over-long prompt never
reaches the local model; Ollama's "server busy" skips it without counting against its
breaker; the warm-up loads the model with the options the calls send.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from redis.asyncio import Redis

from llm_router.client import RouterClient
from llm_router.client.protocol import RouteResult
from llm_router_testing.stubs import REFUSAL_DETAILS, StubServer
from tests.integration.conftest import REDIS_URL, WorkerProcess, worker_env

pytestmark = pytest.mark.integration

QWEN = "ollama_chat/qwen2.5:7b"
HAIKU = "anthropic/claude-haiku-4-5-20251001"
SONNET = "anthropic/claude-sonnet-4-6"
NUM_CTX = 8192
#: A reload would take this long at the stub; a warm call takes milliseconds.
LOAD_S = 0.6
KEY = {"api_key": "sk-ant-test-secret-0123456789"}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["answer", "ok"],
    "properties": {"answer": {"type": "string"}, "ok": {"type": "boolean"}},
}


def chains(url: str) -> str:
    """Breakers at their defaults (3 unwell failures open one): nothing here may count."""
    local = {"model": QWEN, "timeout": 5.0, "api_base": url, "params": {"num_ctx": NUM_CTX}}
    capped = {**local, "params": {"num_ctx": NUM_CTX, "num_predict": 4}}
    haiku = {"model": HAIKU, "timeout": 5.0, "api_base": url, **KEY}
    sonnet = {"model": SONNET, "timeout": 5.0, "api_base": url, **KEY}
    return json.dumps({"default": [local, haiku, sonnet], "capped": [capped, haiku]})


@pytest.fixture(scope="module")
def stub() -> Iterator[StubServer]:
    with StubServer(cold_load=LOAD_S) as server:
        yield server


@pytest.fixture(scope="module")
def queue() -> str:
    return f"llm_router:test:whole:{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def worker(
    redis_available: str, stub: StubServer, queue: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    env = worker_env(
        redis_url=redis_available,
        queue_name=queue,
        chains=chains(stub.url),
        max_jobs="10",
        poll_delay="0.05",
    )
    proc = WorkerProcess(env, tmp_path_factory.mktemp("whole") / "worker.log").start()
    deadline = time.monotonic() + 30
    while not [e for e in proc.events("context_window") if e.get("source") == "Ollama /api/ps"]:
        assert time.monotonic() < deadline, proc.log_text()
        time.sleep(0.05)
    yield proc
    proc.stop()


@pytest.fixture
async def client(worker: WorkerProcess, queue: str) -> AsyncIterator[RouterClient]:
    async with RouterClient(REDIS_URL, queue_name=queue, fallback_poll=0.2) as c:
        yield c


def tag() -> str:
    return uuid.uuid4().hex[:10]


def reasons(result: RouteResult) -> list[tuple[str, str, str | None]]:
    return [(a.model, a.outcome, a.reason) for a in result.attempts]


async def test_warm_up_loads_the_model_as_the_calls_use_it(
    client: RouterClient, stub: StubServer, worker: WorkerProcess
) -> None:
    warm_ups = [
        r.body
        for r in stub.requests
        if r.path == "/api/chat" and isinstance(r.body, dict) and r.body.get("messages") == []
    ]
    assert warm_ups, "no load-only request reached the stub"
    assert warm_ups[0]["options"] == {"num_ctx": NUM_CTX}
    assert warm_ups[0]["keep_alive"] == -1
    window = [e for e in worker.events("context_window") if e.get("source") == "Ollama /api/ps"]
    assert window[-1]["tokens"] == NUM_CTX  # what the loaded runner really has

    result = await client.route(f"the first job after start-up {tag()}")
    assert result.model_used == QWEN
    first = result.attempts[0]
    assert first.load_ms is not None
    assert first.load_ms < LOAD_S * 1000 / 2  # no reload: the runner's options were right
    assert stub.loads == 1


async def test_a_cut_off_local_answer_falls_through(client: RouterClient) -> None:
    result = await client.route(f"stub:qwen=length stub:haiku=text {tag()}")
    assert result.model_used == HAIKU
    assert reasons(result)[0] == (
        QWEN,
        "rejected",
        "Truncated: the answer was cut off at the context window",
    )
    assert result.attempts[0].finish_reason == "length"
    assert result.attempts[1].finish_reason == "stop"


async def test_an_answer_cut_at_num_predict_names_the_limit(
    client: RouterClient, stub: StubServer
) -> None:
    marker = tag()
    result = await client.route(f"tell me a long story about queues {marker}", chain="capped")
    assert result.model_used == HAIKU
    cut = "Truncated: the answer was cut off at num_predict (4)"
    assert reasons(result)[0] == (QWEN, "rejected", cut)
    sent = [r.body for r in stub.requests if marker in json.dumps(r.body) and r.path == "/api/chat"]
    assert sent[0]["options"]["num_predict"] == 4


async def test_a_cut_off_cloud_answer_falls_through(client: RouterClient) -> None:
    prompt = f"stub:qwen=refusal stub:haiku=length stub:sonnet=json {tag()}"
    result = await client.route(prompt, schema=SCHEMA)
    assert result.model_used == SONNET
    assert result.content == {"answer": "sonnet", "ok": True}
    haiku = result.attempts[1]
    assert (haiku.model, haiku.outcome) == (HAIKU, "rejected")
    assert haiku.reason == "Truncated: the answer was cut off at max_tokens (4,096)"
    assert haiku.output_tokens is not None  # the cut answer was paid for, and counted


async def test_provider_refusals_fall_through_and_leave_the_breaker_closed(
    client: RouterClient, redis: Redis
) -> None:
    pubsub = redis.pubsub()
    await pubsub.subscribe("llm_router_metrics")
    try:
        results = [
            await client.route(f"stub:qwen=refusal stub:haiku=provider_refusal {tag()}")
            for _ in range(4)
        ]
        ids = {r.job_id for r in results}
        events: list[dict[str, Any]] = []
        deadline = time.monotonic() + 10
        while len(events) < 4 and time.monotonic() < deadline:  # other tests publish too
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None and json.loads(message["data"])["job_id"] in ids:
                events.append(json.loads(message["data"]))
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    expected = f"ProviderRefusal: {REFUSAL_DETAILS['category']}: {REFUSAL_DETAILS['explanation']}"
    for result in results:
        assert result.model_used == SONNET
        assert reasons(result)[1] == (HAIKU, "rejected", expected)
        assert result.attempts[1].finish_reason == "content_filter"
    ours = events
    assert len(ours) == 4
    assert ours[-1]["attempts"][1]["reason"] == expected  # the metrics event carries it
    assert ours[-1]["breakers"][HAIKU] == "closed"
    after = await client.route(f"stub:qwen=refusal stub:haiku=text {tag()}")
    assert after.model_used == HAIKU  # still called: four refusals are not ill health


async def test_five_busy_answers_leave_the_local_breaker_closed(
    client: RouterClient, stub: StubServer
) -> None:
    busy = [await client.route(f"stub-fail:qwen=503x1 {tag()}") for _ in range(5)]
    for result in busy:
        model, outcome, reason = reasons(result)[0]
        assert (model, outcome) == (QWEN, "skipped")
        assert reason is not None
        assert reason.startswith("busy: ")
        assert "server busy" in reason
        assert result.model_used == HAIKU
    marker = tag()
    result = await client.route(f"and now a plain question {marker}")
    assert result.model_used == QWEN  # the breaker never counted the 503s
    assert [a.outcome for a in result.attempts] == ["success"]


async def test_an_over_long_prompt_is_skipped_before_reaching_the_local_model(
    client: RouterClient, stub: StubServer
) -> None:
    marker = tag()
    long_prompt = f"{marker} " + "Please read every line of this report carefully. " * 1200
    result = await client.route(long_prompt)
    assert result.model_used == HAIKU
    model, outcome, reason = reasons(result)[0]
    assert (model, outcome) == (QWEN, "skipped")
    assert reason is not None
    assert reason.startswith("context: ~")
    assert reason.endswith(f"> {NUM_CTX:,} (Ollama /api/ps)")
    assert result.attempts[0].latency_ms < 100
    reached = [r for r in stub.requests if r.path == "/api/chat" and marker in json.dumps(r.body)]
    assert reached == []  # never sent: Ollama would have answered half of it
    short = await client.route(f"a short question {marker}")
    assert short.model_used == QWEN


async def test_an_over_long_prompt_would_have_been_truncated_silently(stub: StubServer) -> None:
    """What the skip prevents: the stub, as Ollama, answers what is left of the prompt."""
    import httpx

    old = "The first part of the report. " * 2000
    messages = [
        {"role": "system", "content": "You summarise reports."},
        {"role": "user", "content": old},
        {"role": "user", "content": "Summarise the report above."},
    ]
    before = stub.truncated
    body = {"model": "qwen2.5:7b", "messages": messages, "stream": False}
    body["options"] = {"num_ctx": NUM_CTX}
    answer = await asyncio.to_thread(
        lambda: httpx.post(f"{stub.url}/api/chat", json=body, timeout=10).json()
    )
    assert answer["done_reason"] == "stop"  # nothing says half the prompt was dropped
    assert answer["prompt_eval_count"] < len(old) // 4
    assert stub.truncated == before + 1
