"""An OpenAI-compatible local server (llama.cpp's, llama-cpp-python's, vLLM, LM Studio)
as the local step: `openai/<name>` with `local = true`.

The stub speaks llama.cpp's server here (``/health`` 503 "Loading model" while it
loads, ``/props`` with its ``n_ctx``, ``/v1/chat/completions``, OpenAI's error shape,
400 ``exceed_context_size_error`` for a prompt over its context). The worker waits for
it to be ready instead of asking it to load, learns its window, sends the schema in the
form it is told, never a cloud key, and treats it as local: free, unbudgeted, no
retries.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from llm_router.client import RouterClient
from llm_router_testing.stubs import StubServer
from tests.integration.conftest import (
    HAIKU,
    REDIS_URL,
    WorkerProcess,
    cloud_model,
    preloaded,
    worker_env,
)

pytestmark = pytest.mark.integration

LOCAL = "openai/smollm2"
LOADING_S = 2.0
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"answer": {"type": "string"}, "ok": {"type": "boolean"}},
    "required": ["answer", "ok"],
}


@pytest.fixture(scope="module")
def local_server() -> Iterator[StubServer]:
    """llama.cpp's server with a 2,048-token context."""
    with StubServer(models=["smollm2"], num_ctx=2048) as server:
        yield server


@pytest.fixture(scope="module")
def worker(
    local_server: StubServer, stub: StubServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    local = {
        "model": LOCAL,
        "api_base": local_server.url + "/v1",
        "local": True,
        "timeout": 10.0,
        "structured_output": "json_object",
    }
    haiku = cloud_model(stub.url)
    chains = {"default": [local, haiku], "capped": [local, haiku]}
    env = worker_env(
        redis_url=REDIS_URL,
        queue_name=f"llm_router:test:local:{uuid.uuid4().hex[:6]}",
        chains=json.dumps(chains),
        budgets=json.dumps({"capped": 0}),  # its cloud is off; the local model is not
        poll_delay="0.05",
    )
    env["OPENAI_API_KEY"] = "sk-real-openai-key-must-stay-home"
    preloaded()  # the workers' imports are paid: the next one starts at once
    local_server.load_again(LOADING_S)  # the worker comes up while the model loads
    proc = WorkerProcess(env, tmp_path_factory.mktemp("local") / "worker.log").start()
    yield proc
    proc.stop()


@pytest.fixture
async def client(worker: WorkerProcess) -> AsyncIterator[RouterClient]:
    async with RouterClient(REDIS_URL, queue_name=worker.env["LLM_ROUTER_QUEUE_NAME"]) as c:
        yield c


async def warmed(worker: WorkerProcess) -> list[dict[str, Any]]:
    """Once the warm-up has found the server ready: its ``model_warm`` lines."""
    while not (warm := worker.events("model_warm")):
        await asyncio.sleep(0.05)
    return warm


def sent_to(server: StubServer, marker: str) -> list[Any]:
    return [r for r in server.requests if marker in json.dumps(r.body)]


async def test_a_job_while_the_server_loads_falls_through_and_the_warm_up_waits(
    worker: WorkerProcess, client: RouterClient, local_server: StubServer
) -> None:
    marker = uuid.uuid4().hex
    result = await client.route(f"early {marker}", timeout=30)
    warm = worker.events("model_warm")
    if not warm:  # still loading when the job came: busy, not unwell; the cloud answered
        assert result.model_used == HAIKU
        first = result.attempts[0]
        assert first.outcome == "skipped"
        assert first.reason is not None
        assert first.reason.startswith("busy:")
        assert "Loading model" in first.reason
        warm = await warmed(worker)
    assert warm[0]["model"] == LOCAL
    assert warm[0]["load_ms"] >= 500  # it waited for /health to say ok
    health = [r for r in local_server.requests if r.path == "/health"]
    assert len(health) >= 2  # 503 while loading, then 200
    windows = [e for e in worker.events("context_window") if e["model"] == LOCAL]
    assert windows[-1]["tokens"] == 2048
    assert windows[-1]["source"] == "llama.cpp /props"


async def test_served_locally_free_with_its_schema_form_and_no_cloud_key(
    worker: WorkerProcess, client: RouterClient, local_server: StubServer
) -> None:
    await warmed(worker)
    marker = uuid.uuid4().hex
    result = await client.route(f"stub:smollm2=json {marker}", schema=SCHEMA, timeout=30)
    assert result.model_used == LOCAL
    assert result.content == {"answer": "smollm2", "ok": True}
    assert result.cost_usd == 0.0
    (request,) = sent_to(local_server, marker)
    assert request.body["response_format"] == {"type": "json_object", "schema": SCHEMA}
    assert "keep_alive" not in request.body  # Ollama's field, not this server's
    assert request.headers["authorization"] == "Bearer no-key"  # never OPENAI_API_KEY


async def test_local_is_never_budgeted_or_retried(
    worker: WorkerProcess, client: RouterClient, local_server: StubServer
) -> None:
    await warmed(worker)
    marker = uuid.uuid4().hex
    capped = await client.route(f"capped {marker}", chain="capped", timeout=30)
    assert capped.model_used == LOCAL  # a budget of 0 turns the cloud off, not this
    failing = uuid.uuid4().hex
    result = await client.route(f"stub-fail:smollm2=503x1 {failing}", timeout=30)
    assert result.model_used == HAIKU
    assert result.attempts[0].outcome == "rejected"
    assert result.attempts[0].retries == 0
    assert len(sent_to(local_server, failing)) == 1  # no retry of a local model


async def test_a_prompt_over_its_context_skips_it_unsent(
    worker: WorkerProcess, client: RouterClient, local_server: StubServer
) -> None:
    await warmed(worker)
    marker = uuid.uuid4().hex
    result = await client.route(f"{marker} " + "word " * 3000, timeout=30)
    assert result.model_used == HAIKU
    first = result.attempts[0]
    assert first.outcome == "skipped"
    assert first.reason is not None
    assert first.reason.startswith("context:")
    assert "2,048" in first.reason
    assert sent_to(local_server, marker) == []
