"""The chain (with a fake ``call_model``) and the litellm call wrapper (with no network)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import litellm
import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from llm_router.client.client import RouteFailed
from llm_router.client.keys import METRICS_COUNTERS_KEY
from llm_router.client.protocol import RouteRequest
from llm_router.worker import router as router_module
from llm_router.worker.calls import (
    ModelCallError,
    Reply,
    build_kwargs,
    call_model,
    register_local_models,
)
from llm_router.worker.router import Router
from llm_router.worker.settings import ModelConfig, Settings

M1, M2, M3 = "ollama_chat/unit-qwen", "anthropic/unit-haiku", "anthropic/unit-sonnet"
SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["action"],
    "properties": {"action": {"type": "string"}},
}
USER = [{"role": "user", "content": "What should I do?"}]

Scripted = str | Reply | ModelCallError


@dataclass
class FakeCall:
    """Stands in for ``call_model``: a scripted reply per model, and a log of calls."""

    replies: dict[str, Scripted]
    calls: list[dict[str, Any]] = field(default_factory=list)

    async def __call__(
        self,
        cfg: ModelConfig,
        messages: list[dict[str, Any]],
        schema: dict[str, Any] | None = None,
        *,
        anthropic_max_tokens: int = 4096,
    ) -> Reply:
        self.calls.append(
            {
                "model": cfg.model,
                "messages": messages,
                "schema": schema,
                "anthropic_max_tokens": anthropic_max_tokens,
            }
        )
        await asyncio.sleep(0)
        reply = self.replies[cfg.model]
        if isinstance(reply, ModelCallError):
            raise reply
        return reply if isinstance(reply, Reply) else Reply(reply.strip())

    @property
    def models(self) -> list[str]:
        return [c["model"] for c in self.calls]


@pytest.fixture
def settings() -> Settings:
    return Settings(
        chains={
            "default": [
                ModelConfig(model=M1, timeout=1, api_base="http://127.0.0.1:9"),
                ModelConfig(model=M2, timeout=1),
                ModelConfig(model=M3, timeout=1),
            ],
            "solo": [ModelConfig(model=M3, timeout=1)],
        },
        anthropic_max_tokens=321,
    )


FakeFactory = Callable[..., FakeCall]


@pytest.fixture
def fake_call(monkeypatch: pytest.MonkeyPatch) -> FakeFactory:
    def install(**replies: Scripted) -> FakeCall:
        by_model = {
            M1: replies.get("m1", "x"),
            M2: replies.get("m2", "x"),
            M3: replies.get("m3", "x"),
        }
        fake = FakeCall(by_model)
        monkeypatch.setattr(router_module, "call_model", fake)
        return fake

    return install


# --- the chain -----------------------------------------------------------------------------


async def test_first_success_stops_the_chain(settings: Settings, fake_call: FakeFactory) -> None:
    fake = fake_call(m1="Paris.", m2="Lyon.")
    result = await Router(settings).route(USER, context="unit.ctx")
    assert result.ok
    assert result.content == "Paris."
    assert result.raw_text == "Paris."
    assert result.model_used == M1
    assert fake.models == [M1]
    assert [(a.model, a.outcome, a.reason) for a in result.attempts] == [(M1, "success", None)]


async def test_call_model_gets_messages_schema_and_max_tokens(
    settings: Settings, fake_call: FakeFactory
) -> None:
    fake = fake_call(m1='{"action": "wait"}')
    result = await Router(settings).route(
        [{"role": "system", "content": "be brief"}, *USER], schema=SCHEMA
    )
    assert result.content == {"action": "wait"}
    call = fake.calls[0]
    assert call["messages"] == [{"role": "system", "content": "be brief"}, *USER]
    assert call["schema"] == SCHEMA
    assert call["anthropic_max_tokens"] == 321


async def test_refusal_falls_back_to_next(settings: Settings, fake_call: FakeFactory) -> None:
    fake = fake_call(m1="Nie wiem, przepraszam.", m2="Go left.")
    result = await Router(settings).route(USER)
    assert result.ok
    assert result.model_used == M2
    assert result.content == "Go left."
    assert fake.models == [M1, M2]
    first = result.attempts[0]
    assert first.outcome == "rejected"
    assert first.reason is not None
    assert "nie wiem" in first.reason
    assert result.attempts[1].outcome == "success"


async def test_invalid_json_and_schema_violation_are_invalid(
    settings: Settings, fake_call: FakeFactory
) -> None:
    fake = fake_call(m1="let me think", m2='{"action": 5}', m3='```json\n{"action": "go"}\n```')
    result = await Router(settings).route(USER, schema=SCHEMA)
    assert result.ok
    assert result.model_used == M3
    assert result.content == {"action": "go"}
    assert fake.models == [M1, M2, M3]
    outcomes = [a.outcome for a in result.attempts]
    assert outcomes == ["invalid", "invalid", "success"]
    assert result.attempts[0].reason is not None
    assert result.attempts[0].reason.startswith("JSONDecodeError")
    assert result.attempts[1].reason is not None
    assert "SchemaValidationError at action" in result.attempts[1].reason


async def test_model_call_error_is_rejected_with_its_reason(
    settings: Settings, fake_call: FakeFactory
) -> None:
    fake_call(m1=ModelCallError("Timeout after 1.0s"), m2="ok")
    result = await Router(settings).route(USER)
    assert result.model_used == M2
    assert result.attempts[0].outcome == "rejected"
    assert result.attempts[0].reason == "Timeout after 1.0s"


async def test_a_window_named_in_a_refusal_keeps_longer_prompts_from_the_model(
    settings: Settings, fake_call: FakeFactory
) -> None:
    too_long = "This model's maximum context length is 512 tokens. However, you requested 900"
    fake = fake_call(m1=ModelCallError(f"BadRequestError: {too_long}", window=512), m2="ok")
    router = Router(settings)
    long_prompt = [{"role": "user", "content": "word " * 600}]
    first = await router.route(long_prompt)
    second = await router.route(long_prompt)
    short = await router.route(USER)
    # The second long prompt was never sent; a short one still is (its scripted error
    # sends it on to the cloud).
    assert fake.models == [M1, M2, M2, M1, M2]
    assert first.attempts[0].outcome == "rejected"
    assert second.attempts[0].outcome == "skipped"
    assert second.attempts[0].reason is not None
    assert second.attempts[0].reason.endswith("> 512 (its context error)")
    assert short.attempts[0].outcome == "rejected"


async def test_all_fail(settings: Settings, fake_call: FakeFactory) -> None:
    fake = fake_call(
        m1=ModelCallError("APIConnectionError: refused"),
        m2="I cannot help with that",
        m3="not json",
    )
    router = Router(settings)
    request = RouteRequest.model_validate({"messages": USER, "schema": SCHEMA, "context": "c1"})
    result = await router.run(request, job_id="job-1")
    assert result.status == "failed"
    assert not result.ok
    assert result.model_used == "none"
    assert result.content is None
    assert len(result.attempts) == 3
    assert [a.outcome for a in result.attempts] == ["rejected", "rejected", "invalid"]
    assert result.error is not None
    assert "default" in result.error
    assert result.job_id == "job-1"
    assert result.context == "c1"
    assert fake.models == [M1, M2, M3]

    with pytest.raises(RouteFailed) as info:
        await router.route(USER, schema=SCHEMA, context="c1")
    assert info.value.result.status == "failed"
    assert len(info.value.attempts) == 3
    assert [a.model for a in info.value.attempts] == [M1, M2, M3]
    assert "APIConnectionError: refused" in str(info.value)


async def test_unknown_chain_is_invalid_before_any_call(
    settings: Settings, fake_call: FakeFactory
) -> None:
    fake = fake_call(m1="never")
    router = Router(settings)
    request = RouteRequest.model_validate({"messages": USER, "chain": "nope"})
    result = await router.run(request, job_id="j")
    assert result.status == "invalid_request"
    assert result.error is not None
    assert "nope" in result.error
    assert "default" in result.error
    assert result.attempts == []
    with pytest.raises(RouteFailed) as info:
        await router.route(USER, chain="nope")
    assert info.value.result.status == "invalid_request"
    assert fake.calls == []


async def test_named_chain_is_used(settings: Settings, fake_call: FakeFactory) -> None:
    fake = fake_call(m3="solo answer")
    result = await Router(settings).route(USER, chain="solo")
    assert result.model_used == M3
    assert result.chain == "solo"
    assert fake.models == [M3]


async def test_invalid_schema_is_invalid_before_any_call(
    settings: Settings, fake_call: FakeFactory
) -> None:
    fake = fake_call(m1="never")
    router = Router(settings)
    with pytest.raises(RouteFailed) as info:
        await router.route(USER, schema={"type": "objekt"})
    assert info.value.result.status == "invalid_request"
    assert "invalid JSON Schema" in str(info.value)
    # A request that skipped validation still cannot reach a model.
    request = RouteRequest.model_construct(
        messages=RouteRequest.model_validate({"messages": USER}).messages,
        json_schema={"type": "objekt"},
        context=None,
        chain="default",
        metadata={},
    )
    result = await router.run(request)
    assert result.status == "invalid_request"
    assert result.error is not None
    assert "invalid JSON Schema" in result.error
    assert fake.calls == []


async def test_invalid_messages_raise_route_failed(
    settings: Settings, fake_call: FakeFactory
) -> None:
    fake = fake_call()
    with pytest.raises(RouteFailed) as info:
        await Router(settings).route([{"role": "robot", "content": "x"}])
    assert info.value.result.status == "invalid_request"
    assert fake.calls == []


async def test_attempt_latencies_and_labels(settings: Settings, fake_call: FakeFactory) -> None:
    fake_call(m1="I'm unable to", m2="fine")
    request = RouteRequest.model_validate({"messages": USER, "context": "svc.reconcile"})
    result = await Router(settings).run(request, job_id="abc123")
    assert result.job_id == "abc123"
    assert result.context == "svc.reconcile"
    assert result.chain == "default"
    assert all(a.latency_ms >= 0 for a in result.attempts)
    assert result.latency_ms >= 0
    assert result.latency_ms >= max(a.latency_ms for a in result.attempts) - 1


async def test_slow_model_latency_is_measured(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def slow(
        cfg: ModelConfig,
        messages: list[dict[str, Any]],
        schema: dict[str, Any] | None = None,
        *,
        anthropic_max_tokens: int = 4096,
    ) -> Reply:
        await asyncio.sleep(0.03)
        return Reply("done")

    monkeypatch.setattr(router_module, "call_model", slow)
    result = await Router(settings).route(USER)
    assert result.attempts[0].latency_ms >= 25
    assert result.latency_ms >= 25


async def test_router_metrics_in_memory(settings: Settings, fake_call: FakeFactory) -> None:
    fake_call(m1="I don't know", m2="yes")
    router = Router(settings)
    await router.route(USER)
    await router.route(USER)
    snapshot = await router.metrics.snapshot()
    assert snapshot[M1] == {"success": 0, "fallback": 2, "error": 0, "skipped": 0}
    assert snapshot[M2] == {"success": 2, "fallback": 0, "error": 0, "skipped": 0}


async def test_router_metrics_in_redis(
    settings: Settings, fake_call: FakeFactory, redis: Redis
) -> None:
    fake_call(m1=ModelCallError("boom"), m2=ModelCallError("boom"), m3=ModelCallError("boom"))
    router = Router(settings, redis=redis)
    result = await router.run(RouteRequest.model_validate({"messages": USER}), job_id="r1")
    assert result.status == "failed"
    raw = await redis.hgetall(METRICS_COUNTERS_KEY)  # type: ignore[misc]
    counters = {k.decode(): int(v) for k, v in raw.items()}
    assert counters == {f"{M1}|fallback": 1, f"{M2}|fallback": 1, f"{M3}|error": 1}


async def test_broken_metrics_redis_never_breaks_routing(
    settings: Settings, fake_call: FakeFactory, broken_redis: Redis
) -> None:
    fake_call(m1="answer")
    result = await Router(settings, redis=broken_redis).route(USER)
    assert result.ok
    assert result.content == "answer"


# --- calls: build_kwargs, register_local_models, call_model (no network) --------------------


def test_build_kwargs_anthropic_gets_max_tokens() -> None:
    cfg = ModelConfig(model="anthropic/claude-haiku-4-5-20251001", timeout=30)
    kwargs = build_kwargs(cfg, USER, None, 1234)
    assert kwargs["max_tokens"] == 1234
    assert kwargs["model"] == cfg.model
    assert kwargs["messages"] == USER
    assert kwargs["timeout"] == 30
    assert kwargs["num_retries"] == 0
    assert "api_base" not in kwargs
    assert "api_key" not in kwargs
    assert "response_format" not in kwargs
    bare = build_kwargs(ModelConfig(model="claude-sonnet-4-6", timeout=1), USER, None, 77)
    assert bare["max_tokens"] == 77


def test_build_kwargs_params_override_max_tokens() -> None:
    cfg = ModelConfig(
        model="anthropic/claude-sonnet-4-6", timeout=5, params={"max_tokens": 99, "temperature": 0}
    )
    kwargs = build_kwargs(cfg, USER, None, 4096)
    assert kwargs["max_tokens"] == 99
    assert kwargs["temperature"] == 0


def test_build_kwargs_local_model_has_no_max_tokens() -> None:
    cfg = ModelConfig(model="ollama_chat/qwen2.5:7b", timeout=8, api_base="http://localhost:11434")
    kwargs = build_kwargs(cfg, USER, None, 4096)
    assert "max_tokens" not in kwargs
    assert kwargs["api_base"] == "http://localhost:11434"
    assert kwargs["num_retries"] == 0


def test_build_kwargs_schema_only_with_structured_output() -> None:
    structured = ModelConfig(model="ollama_chat/q", timeout=8)
    kwargs = build_kwargs(structured, USER, SCHEMA, 4096)
    assert kwargs["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": SCHEMA},
    }
    plain = ModelConfig(model="ollama_chat/q", timeout=8, structured_output=False)
    assert "response_format" not in build_kwargs(plain, USER, SCHEMA, 4096)
    assert "response_format" not in build_kwargs(structured, USER, None, 4096)


def test_an_openai_compatible_local_server_is_local_but_not_ollama() -> None:
    llama = ModelConfig(
        model="openai/smollm2",
        timeout=8,
        api_base="http://127.0.0.1:8080/v1",
        local=True,
        structured_output="json_object",
    )
    assert llama.is_local
    assert not llama.is_ollama
    assert llama.retries == 0
    kwargs = build_kwargs(llama, USER, SCHEMA, 4096)
    assert kwargs["response_format"] == {"type": "json_object", "schema": SCHEMA}
    assert "keep_alive" not in kwargs  # Ollama's field
    assert kwargs["api_key"] == "no-key"  # never the environment's OPENAI_API_KEY
    keyed = llama.model_copy(update={"api_key": SecretStr("sk-local")})
    assert build_kwargs(keyed, USER, None, 4096)["api_key"] == "sk-local"
    cloud = ModelConfig(model="openai/gpt-4.1-mini", timeout=8)
    assert not cloud.is_local
    assert cloud.retries == 2
    assert "api_key" not in build_kwargs(cloud, USER, None, 4096)
    ollama = ModelConfig(model="ollama_chat/q", timeout=8, local=False)
    assert not ollama.is_local  # said so: billed and budgeted like a cloud model
    assert ollama.is_ollama


def test_build_kwargs_passes_api_key_secret() -> None:
    cfg = ModelConfig(model="anthropic/claude-sonnet-4-6", timeout=5, api_key=SecretStr("sk-1"))
    kwargs = build_kwargs(cfg, USER, None, 4096)
    assert kwargs["api_key"] == "sk-1"
    assert isinstance(kwargs["api_key"], str)


def test_register_local_models_only_local(monkeypatch: pytest.MonkeyPatch) -> None:
    registered: list[dict[str, Any]] = []
    real = litellm.register_model

    def spy(rows: dict[str, Any], **kw: Any) -> Any:
        registered.append(rows)
        return real(rows, **kw)

    monkeypatch.setattr(litellm, "register_model", spy)
    models = [
        ModelConfig(model="ollama_chat/unit-reg-a:1b", timeout=1),
        ModelConfig(model="ollama/unit-reg-b", timeout=1),
        ModelConfig(model="anthropic/unit-reg-c", timeout=1),
        ModelConfig(model="claude-unit-reg-d", timeout=1),
    ]
    register_local_models(models)
    assert len(registered) == 1
    assert set(registered[0]) == {"ollama_chat/unit-reg-a:1b", "ollama/unit-reg-b"}
    assert registered[0]["ollama/unit-reg-b"]["litellm_provider"] == "ollama"
    # litellm files a row under the name without its provider prefix.
    for name, provider in (("unit-reg-a:1b", "ollama_chat"), ("unit-reg-b", "ollama")):
        row = litellm.model_cost[name]
        assert row["litellm_provider"] == provider
        assert row["input_cost_per_token"] == 0
        assert row["output_cost_per_token"] == 0
    for name in ("anthropic/unit-reg-c", "unit-reg-c", "claude-unit-reg-d"):
        assert name not in litellm.model_cost


def test_register_local_models_with_no_local_model_registers_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registered: list[Any] = []
    monkeypatch.setattr(litellm, "register_model", registered.append)
    register_local_models([ModelConfig(model="anthropic/x", timeout=1)])
    assert registered == []


@dataclass
class _Message:
    content: Any


@dataclass
class _Choice:
    message: _Message


@dataclass
class _Response:
    choices: list[_Choice]


def _fake_acompletion(
    monkeypatch: pytest.MonkeyPatch, reply: Any = None, delay: float = 0.0, exc: Any = None
) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []

    async def acompletion(**kwargs: Any) -> Any:
        seen.append(kwargs)
        if delay:
            await asyncio.sleep(delay)
        if exc is not None:
            raise exc
        return reply

    monkeypatch.setattr(litellm, "acompletion", acompletion)
    return seen


async def test_call_model_returns_stripped_text(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _fake_acompletion(monkeypatch, _Response([_Choice(_Message("  hi there \n"))]))
    cfg = ModelConfig(model="anthropic/claude-sonnet-4-6", timeout=2)
    reply = await call_model(cfg, USER, SCHEMA, anthropic_max_tokens=55)
    assert reply.text == "hi there"
    assert seen[0]["max_tokens"] == 55
    assert seen[0]["response_format"]["json_schema"]["schema"] == SCHEMA


async def test_call_model_enforces_its_own_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_acompletion(monkeypatch, _Response([_Choice(_Message("late"))]), delay=5)
    cfg = ModelConfig(model="ollama_chat/q", timeout=0.05)
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(ModelCallError) as info:
        await call_model(cfg, USER)
    assert loop.time() - start < 1
    assert info.value.reason == "Timeout after 0.05s"


async def test_call_model_maps_provider_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    exc = litellm.exceptions.Timeout(message="slow", model="m", llm_provider="anthropic")
    _fake_acompletion(monkeypatch, exc=exc)
    with pytest.raises(ModelCallError, match=r"\(provider\)"):
        await call_model(ModelConfig(model="anthropic/m", timeout=3), USER)


async def test_call_model_maps_any_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_acompletion(monkeypatch, exc=ConnectionRefusedError("line one\nline two " + "x" * 400))
    with pytest.raises(ModelCallError) as info:
        await call_model(ModelConfig(model="ollama_chat/q", timeout=3), USER)
    reason = info.value.reason
    assert reason.startswith("ConnectionRefusedError: line one line two")
    assert "\n" not in reason
    assert len(reason) <= 300


@pytest.mark.parametrize(
    "reply",
    [
        _Response([_Choice(_Message(None))]),
        _Response([_Choice(_Message("   "))]),
    ],
)
async def test_call_model_empty_answer_is_a_reply_the_checks_reject(
    monkeypatch: pytest.MonkeyPatch, reply: Any, settings: Settings
) -> None:
    _fake_acompletion(monkeypatch, reply)
    answer = await call_model(ModelConfig(model="ollama_chat/q", timeout=3), USER)
    assert answer.text == ""
    verdict = await Router(settings).checks.judge(answer.text, None, answer.finish)
    assert (verdict.outcome, verdict.reason) == (
        "rejected",
        "EmptyResponse: the model returned no text",
    )


@pytest.mark.parametrize(
    ("model", "message", "window"),
    [
        (  # llama-cpp-python's server and vLLM, in OpenAI's words
            "openai/smollm2",
            "This model's maximum context length is 2048 tokens. However, you requested "
            "3010 tokens (3002 in the messages, 8 in the completion). Please reduce the "
            "length of the messages or completion.",
            2048,
        ),
        (  # llama.cpp's server
            "openai/smollm2",
            "request (4476 tokens) exceeds the available context size (4096 tokens), "
            "try increasing it",
            4096,
        ),
        ("openai/smollm2", "Invalid value for 'temperature'", None),
        (  # a cloud model's window is litellm's, never guessed from words
            "openai/gpt-4o",
            "This model's maximum context length is 128000 tokens.",
            None,
        ),
    ],
)
async def test_call_model_reads_the_window_a_local_server_names_in_refusing(
    monkeypatch: pytest.MonkeyPatch, model: str, message: str, window: int | None
) -> None:
    exc = litellm.exceptions.BadRequestError(message, model=model, llm_provider="openai")
    _fake_acompletion(monkeypatch, exc=exc)
    local = model == "openai/smollm2"
    cfg = ModelConfig(model=model, timeout=3, local=local, api_base="http://127.0.0.1:9/v1")
    with pytest.raises(ModelCallError) as info:
        await call_model(cfg, USER)
    assert info.value.window == window
    assert not info.value.unwell  # one request too long, not a broken server


async def test_call_model_malformed_response(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_acompletion(monkeypatch, _Response([]))
    with pytest.raises(ModelCallError, match="MalformedResponse"):
        await call_model(ModelConfig(model="ollama_chat/q", timeout=3), USER)


def test_calls_module_keeps_litellm_offline_and_lean() -> None:
    assert os.environ["LITELLM_OFFLINE_MODE"] == "true"
    assert os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"
    # Importing llm_router.worker.calls set these on the shared litellm module.
    assert litellm.disable_token_counter is True
    assert litellm.suppress_debug_info is True
