"""litellm's real HTTP path against the stub servers.

These tests pin the wire contract the rest of the suite relies on: if a litellm upgrade changes how
it talks to Ollama or Anthropic (routes, JSON-mode shape, error mapping), it shows here first.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import litellm
import pytest
from litellm.exceptions import AuthenticationError, InternalServerError, RateLimitError
from pydantic import SecretStr

from llm_router.worker import calls
from llm_router.worker.settings import ModelConfig
from llm_router_testing import stubs
from llm_router_testing.stubs import (
    PARTIAL_REFUSAL_TEXT,
    REFUSAL_DETAILS,
    REFUSAL_MARKERS,
    REFUSAL_TEXT,
    Behaviour,
    RecordedRequest,
    StubServer,
    answer_text,
)

QWEN = "ollama_chat/qwen2.5:7b"
HAIKU = "anthropic/claude-haiku-4-5-20251001"
SONNET = "anthropic/claude-sonnet-4-6"
SLOW_DELAY = 0.3
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"answer": {"type": "string"}, "ok": {"type": "boolean"}},
    "required": ["answer", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def stub() -> Iterator[StubServer]:
    # Registered, litellm takes the model info from its map instead of probing /api/show.
    litellm.register_model(
        {
            QWEN: {
                "litellm_provider": "ollama_chat",
                "mode": "chat",
                "input_cost_per_token": 0,
                "output_cost_per_token": 0,
                "max_tokens": 8192,
                "max_input_tokens": 32768,
                "max_output_tokens": 8192,
            }
        }
    )
    with StubServer(slow_delay=SLOW_DELAY) as server:
        yield server


@pytest.fixture(autouse=True)
def fresh(stub: StubServer) -> None:
    stub.clear()
    stub.reset_behaviours()


async def ask(stub: StubServer, model: str, user: str, system: str | None = None, **kw: Any) -> Any:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user})
    if model.startswith("anthropic/"):
        kw = {"api_key": "test-key", "max_tokens": 256, **kw}
    return await litellm.acompletion(model=model, api_base=stub.url, messages=messages, **kw)


def generations(stub: StubServer) -> list[RecordedRequest]:
    return [r for r in stub.requests if r.behaviour is not None]


def content(response: Any) -> str:
    return str(response.choices[0].message.content)


async def test_ollama_text_answer_over_api_chat(stub: StubServer) -> None:
    response = await ask(stub, QWEN, "hello stub")

    assert content(response) == "Stub qwen2.5:7b answers: hello stub"
    [request] = generations(stub)
    assert (request.method, request.path, request.model) == ("POST", "/api/chat", "qwen2.5:7b")
    assert request.body["stream"] is False
    assert (request.behaviour, request.key) == (Behaviour.TEXT, "qwen2.5:7b")


async def test_registered_ollama_model_is_not_probed_with_api_show(stub: StubServer) -> None:
    await ask(stub, QWEN, "hello")
    await asyncio.sleep(0.3)  # litellm's post-call logging runs after acompletion returns

    assert [r.path for r in stub.requests] == ["/api/chat"]


async def test_unregistered_ollama_model_is_probed_with_api_show(
    stub: StubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Some probes ignore api_base and use OLLAMA_API_BASE (else localhost:11434): keep them here.
    monkeypatch.setenv("OLLAMA_API_BASE", stub.url)
    await ask(stub, "ollama_chat/llama3.1:8b", "hello")
    for _ in range(60):  # the probe that honours api_base runs in post-call logging
        if any(r.path == "/api/show" for r in stub.requests):
            break
        await asyncio.sleep(0.05)

    await asyncio.sleep(0.3)  # let late probes land here rather than in the next test
    shows = [r for r in stub.requests if r.path == "/api/show"]
    assert shows
    assert shows[0].body == {"name": "llama3.1:8b"}


async def test_json_directive_in_system_message(stub: StubServer) -> None:
    response = await ask(stub, QWEN, "give me json", system="stub:qwen=json")

    assert json.loads(content(response)) == {"answer": "qwen", "ok": True}
    assert generations(stub)[0].key == "qwen"


async def test_ollama_response_format_is_sent_as_format(stub: StubServer) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    response = await ask(stub, QWEN, "stub:*=json", response_format=response_format)

    assert json.loads(content(response)) == {"answer": "*", "ok": True}
    assert generations(stub)[0].body["format"] == SCHEMA


async def test_directive_for_another_model_does_not_apply(stub: StubServer) -> None:
    stub.set_behaviour("qwen", Behaviour.FENCED)
    response = await ask(stub, QWEN, "stub:haiku=http_500 still fine")

    assert content(response).startswith("Here you go:\n```json\n")
    assert generations(stub)[0].behaviour is Behaviour.FENCED


@pytest.mark.parametrize(
    ("model", "behaviour", "error", "status"),
    [
        (QWEN, "http_500", InternalServerError, 500),
        (QWEN, "http_429", RateLimitError, 429),
        (HAIKU, "http_500", InternalServerError, 500),
        (HAIKU, "http_429", RateLimitError, 429),
    ],
)
async def test_http_errors_map_to_litellm_exceptions(
    stub: StubServer, model: str, behaviour: str, error: type[Exception], status: int
) -> None:
    with pytest.raises(error) as caught:
        await ask(stub, model, f"stub:*={behaviour} please")

    assert type(caught.value) is error
    assert getattr(caught.value, "status_code", None) == status
    assert len(generations(stub)) == 1  # litellm.acompletion itself does not retry


async def test_anthropic_text_answer_and_headers(stub: StubServer) -> None:
    response = await ask(stub, HAIKU, "hello claude")

    assert content(response) == "Stub claude-haiku-4-5-20251001 answers: hello claude"
    [request] = generations(stub)
    assert request.path == "/v1/messages"
    assert request.headers["x-api-key"] == "test-key"
    assert request.headers["anthropic-version"]
    assert request.body["max_tokens"] == 256


@pytest.mark.parametrize("model", [HAIKU, SONNET])
async def test_anthropic_json_schema_uses_native_output_format(
    stub: StubServer, model: str
) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    response = await ask(stub, model, "stub:claude=json", response_format=response_format)

    assert json.loads(content(response)) == {"answer": "claude", "ok": True}
    [request] = generations(stub)
    assert request.body["output_format"] == {"type": "json_schema", "schema": SCHEMA}
    assert "structured-outputs-2025-11-13" in request.headers["anthropic-beta"]
    assert "tools" not in request.body


async def test_anthropic_open_schema_uses_forced_json_tool(stub: StubServer) -> None:
    open_schema = {**SCHEMA, "additionalProperties": True}
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": open_schema},
    }
    response = await ask(stub, HAIKU, "stub:haiku=json", response_format=response_format)

    assert json.loads(content(response)) == {"answer": "haiku", "ok": True}
    [request] = generations(stub)
    assert request.body["tool_choice"] == {"type": "tool", "name": "json_tool_call"}
    assert request.body["tools"][0]["name"] == "json_tool_call"
    assert "output_format" not in request.body


@pytest.mark.parametrize("model", [QWEN, HAIKU])
async def test_streaming_text(stub: StubServer, model: str) -> None:
    stream = await ask(stub, model, "stub:*=text stream me", stream=True)
    pieces = [chunk.choices[0].delta.content or "" async for chunk in stream]

    assert "".join(pieces) == "Stub * answers: stub:*=text stream me"
    assert len(pieces) > 1
    assert generations(stub)[0].body["stream"] is True


@pytest.mark.parametrize("model", [QWEN, HAIKU])
async def test_hang_times_out_and_server_keeps_answering(stub: StubServer, model: str) -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await ask(stub, model, "stub:*=hang")

    assert content(await ask(stub, model, "still there?")).endswith("answers: still there?")


@pytest.mark.parametrize("model", [QWEN, HAIKU])
async def test_slow_answers_after_the_delay(stub: StubServer, model: str) -> None:
    started = time.monotonic()
    async with asyncio.timeout(SLOW_DELAY + 5):
        response = await ask(stub, model, "stub:*=slow take your time")

    assert time.monotonic() - started >= SLOW_DELAY
    assert content(response) == "Stub * answers: stub:*=slow take your time"


async def test_missing_api_key_is_an_authentication_error(
    stub: StubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    with pytest.raises(AuthenticationError):
        await ask(stub, HAIKU, "hello", api_key=None)

    assert stub.requests == []  # litellm refuses before sending


def test_sync_completion_from_a_sync_test(stub: StubServer) -> None:
    messages = [{"role": "user", "content": "stub:qwen=refusal"}]
    response = litellm.completion(model=QWEN, api_base=stub.url, messages=messages)

    assert content(response) == REFUSAL_TEXT


def test_anthropic_rejections_in_wire_format(stub: StubServer) -> None:
    body = {"model": "claude-haiku-4-5-20251001", "messages": [{"role": "user", "content": "x"}]}
    version = {"anthropic-version": "2023-06-01"}
    no_key = httpx.post(f"{stub.url}/v1/messages", json=body, headers=version)
    no_max = httpx.post(f"{stub.url}/v1/messages", json=body, headers={**version, "x-api-key": "k"})

    assert no_key.status_code == 401
    assert no_key.json()["error"] == {
        "type": "authentication_error",
        "message": "invalid x-api-key",
    }
    assert (no_max.status_code, no_max.json()["error"]["type"]) == (400, "invalid_request_error")


def post_messages(stub: StubServer, user: str, **extra: Any) -> httpx.Response:
    """``POST /v1/messages`` as Anthropic's SDK sends it."""
    body = {"model": "claude-x", "max_tokens": 64, "messages": [{"role": "user", "content": user}]}
    headers = {"anthropic-version": "2023-06-01", "x-api-key": "k"}
    return httpx.post(f"{stub.url}/v1/messages", json={**body, **extra}, headers=headers)


def test_anthropic_rate_limit_has_retry_after(stub: StubServer) -> None:
    response = post_messages(stub, "stub:*=http_429", max_tokens=5)

    assert response.status_code == 429
    assert response.headers["retry-after"]
    assert response.json()["error"]["type"] == "rate_limit_error"


def test_ollama_wire_shapes(stub: StubServer) -> None:
    chat = {"model": "qwen2.5:7b", "messages": [{"role": "user", "content": "hi"}]}
    lines = httpx.post(f"{stub.url}/api/chat", json=chat).text.splitlines()
    chunks = [json.loads(line) for line in lines]
    generate = httpx.post(
        f"{stub.url}/api/generate", json={"model": "qwen2.5:7b", "prompt": "hi", "stream": False}
    ).json()
    show = httpx.post(f"{stub.url}/api/show", json={"model": "qwen2.5:7b"}).json()

    assert [c["done"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert {"total_duration", "eval_count", "prompt_eval_count", "done_reason"} <= chunks[-1].keys()
    assert generate["response"] == "Stub qwen2.5:7b answers: hi"
    assert show["model_info"]["qwen2.context_length"] == 32768
    assert {"modelfile", "parameters", "template", "details"} <= show.keys()
    assert httpx.get(f"{stub.url}/api/tags").json()["models"][0]["name"] == "qwen2.5:7b"
    assert httpx.get(f"{stub.url}/api/version").json()["version"]


@pytest.mark.parametrize("behaviour", list(Behaviour))
def test_answer_texts(behaviour: Behaviour) -> None:
    text = answer_text(behaviour, "qwen", "I cannot say; as an AI I'm unable, nie wiem")
    if behaviour in (Behaviour.JSON, Behaviour.FENCED):
        raw = text.split("```json\n")[-1].removesuffix("\n```\n")
        assert json.loads(raw) == {"answer": "qwen", "ok": True}
    elif behaviour is Behaviour.INVALID_JSON:
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)
    elif behaviour is Behaviour.SCHEMA_VIOLATION:
        assert json.loads(text) == {"answer": 42}
    elif behaviour is Behaviour.ECHO:
        assert text == ""  # what follows the first line of the user's text: nothing here
        assert answer_text(behaviour, "qwen", "stub:*=echo\n[1, 2]") == "[1, 2]"
    elif behaviour is Behaviour.DEEP_JSON:
        assert text == "[" * 100_000 + "]" * 100_000
    elif behaviour is Behaviour.HUGE_JSON:
        assert len(json.loads(text)) == 2_000_000
    elif behaviour is Behaviour.PROVIDER_REFUSAL:
        assert text == PARTIAL_REFUSAL_TEXT  # what Anthropic sent before it stopped
    elif behaviour is not Behaviour.REFUSAL:
        assert text.startswith("Stub qwen answers: ")
        assert not any(marker in text.lower() for marker in REFUSAL_MARKERS)


def test_stop_does_not_wait_for_hanging_requests() -> None:
    server = StubServer()
    url = server.start()
    body = {"model": "m", "messages": [{"role": "user", "content": "stub:*=hang"}], "stream": False}
    errors: list[BaseException] = []

    def hang() -> None:
        try:
            httpx.post(f"{url}/api/chat", json=body, timeout=10)
        except httpx.HTTPError as exc:
            errors.append(exc)

    client = threading.Thread(target=hang)
    client.start()
    time.sleep(0.2)
    started = time.monotonic()
    server.stop()
    client.join(timeout=5)

    assert time.monotonic() - started < 1.5
    assert errors  # dropped, never answered


def test_entry_point_serves_until_sigterm() -> None:
    # Run by path, not ``-m``: the package __init__ imports litellm, which takes seconds.
    process = subprocess.Popen(
        [sys.executable, "-P", stubs.__file__, "--port", "0", "--set", "qwen=json"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        chat = {
            "model": "qwen2.5:7b",
            "messages": [{"role": "user", "content": "x"}],
            "stream": False,
        }
        answer = httpx.post(f"{url}/api/chat", json=chat).json()["message"]["content"]
        assert json.loads(answer) == {"answer": "qwen", "ok": True}
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0


def test_anthropic_refusal_in_wire_format(stub: StubServer) -> None:
    """HTTP 200, ``stop_reason: "refusal"``, the text so far and ``stop_details``
    (anthropic-sdk-python: ``Message``, ``RawMessageDeltaEvent``, ``RefusalStopDetails``)."""
    whole = post_messages(stub, "stub:*=provider_refusal")
    streamed = post_messages(stub, "stub:*=provider_refusal", stream=True).text

    assert whole.status_code == 200
    message = whole.json()
    assert message["stop_reason"] == "refusal"
    assert message["stop_details"] == REFUSAL_DETAILS
    assert message["content"] == [{"type": "text", "text": PARTIAL_REFUSAL_TEXT}]
    events = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: ")]
    [delta] = [e for e in events if e["type"] == "message_delta"]
    assert delta["delta"]["stop_reason"] == "refusal"
    assert delta["delta"]["stop_details"] == REFUSAL_DETAILS


@pytest.mark.parametrize("schema", [None, SCHEMA, {**SCHEMA, "additionalProperties": True}])
async def test_the_call_reports_how_the_answer_ended(
    stub: StubServer, schema: dict[str, Any] | None
) -> None:
    """Through litellm's real path: native output format, the forced JSON tool (where
    litellm reports a cut-off answer as ``stop``), plain text."""
    cfg = ModelConfig(
        model=HAIKU, timeout=5, api_base=stub.url, api_key=SecretStr("k"), params={"max_tokens": 5}
    )
    refused = await calls.call_model(
        cfg, [{"role": "user", "content": "stub:*=provider_refusal"}], schema
    )
    cut = await calls.call_model(cfg, [{"role": "user", "content": "a long story " * 20}], schema)

    assert refused.text == PARTIAL_REFUSAL_TEXT
    assert refused.finish.refused
    assert refused.finish.refusal_category == REFUSAL_DETAILS["category"]
    assert refused.finish.refusal_explanation == REFUSAL_DETAILS["explanation"]
    assert cut.finish.truncated
    assert cut.finish.word == "length"
    assert cut.finish.limit == "max_tokens (5)"
