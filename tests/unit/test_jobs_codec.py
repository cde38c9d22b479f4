"""The arq side: the JSON job codec (never pickle), request parsing and the ``route`` job."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
from arq.jobs import DeserializationError, SerializationError, deserialize_job_raw, serialize_result
from arq.worker import JobExecutionFailed
from pydantic import ValidationError
from redis.asyncio import Redis

from llm_router.client.protocol import (
    JOB_FUNCTION,
    METRICS_CHANNEL,
    RouteRequest,
    job_blob,
    result_from_blob,
)
from llm_router.worker import router as router_module
from llm_router.worker.calls import Reply
from llm_router.worker.jobs import (
    deserialize,
    exception_result,
    parse_request,
    redis_settings,
    route,
    serialize,
    worker_settings,
)
from llm_router.worker.router import Router
from llm_router.worker.settings import ModelConfig, Settings

REQUEST: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "context": "unit"}


class _WritesMarker:
    """Unpickling this creates a file: proof that a payload was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def _result_data(r: Any, job_id: str = "job-9") -> dict[str, Any]:
    return {
        "t": 1,
        "f": "route",
        "a": [REQUEST],
        "k": {"request": REQUEST},
        "et": 1,
        "s": False,
        "r": r,
        "st": 2,
        "ft": 3,
        "q": "llm_router:queue",
        "id": job_id,
    }


# --- deserialize -----------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL])
def test_deserialize_refuses_pickle_without_loading(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    blob = pickle.dumps({"t": 1, "f": "route", "a": [_WritesMarker(marker)]}, protocol=protocol)
    with pytest.raises(ValueError, match="pickle"):
        deserialize(blob)
    assert not marker.exists()
    # The payload is live: loading it the way arq would by default does run it.
    loaded = pickle.loads(blob)
    loaded["a"][0].close()
    assert marker.exists()


def test_deserialize_refuses_old_protocol_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "pwned0"
    blob = pickle.dumps(_WritesMarker(marker), protocol=0)
    with pytest.raises(ValueError):  # noqa: PT011 - not JSON, whatever the message
        deserialize(blob)
    assert not marker.exists()


def test_deserialize_refuses_pickle_through_arq(tmp_path: Path) -> None:
    marker = tmp_path / "pwned-arq"
    blob = pickle.dumps({"t": 1, "f": "route", "a": [_WritesMarker(marker)], "k": {}, "et": 1})
    with pytest.raises(DeserializationError):
        deserialize_job_raw(blob, deserializer=deserialize)
    assert not marker.exists()


def test_deserialize_reads_the_client_job_blob() -> None:
    request = RouteRequest.model_validate({**REQUEST, "schema": {"type": "object"}})
    blob = job_blob(request, 42)
    data = deserialize(blob)
    assert data["a"] == [request.wire()]
    function, args, kwargs, job_try, enqueue_ms = deserialize_job_raw(
        blob, deserializer=deserialize
    )
    assert function == JOB_FUNCTION
    assert RouteRequest.model_validate(args[0]) == request
    assert kwargs == {}
    assert job_try == 1
    assert enqueue_ms == 42


# --- serialize -------------------------------------------------------------------------------


def test_serialize_job_blob_is_plain_json() -> None:
    data = {"t": 1, "f": "route", "a": [REQUEST], "k": {}, "et": 5}
    assert json.loads(serialize(data)) == data


def test_serialize_result_strips_request_and_keeps_result() -> None:
    result = {"status": "ok", "content": "hello", "model_used": "m", "job_id": "job-9"}
    blob = serialize(_result_data(result))
    data = json.loads(blob)
    assert data["a"] == []
    assert data["k"] == {}
    assert data["r"] == result
    assert data["id"] == "job-9"
    assert "hi" not in blob.decode()
    assert result_from_blob(blob).content == "hello"


def _serialization_error_with_cause() -> SerializationError:
    try:
        try:
            json.loads(b"\x80garbage")
        except ValueError as exc:
            raise SerializationError("unable to deserialize job") from exc
    except SerializationError as err:
        return err
    raise AssertionError("unreachable")


@pytest.mark.parametrize(
    "exc",
    [
        _serialization_error_with_cause(),
        SerializationError("unable to deserialize job"),
        DeserializationError("unable to deserialize job"),
        JobExecutionFailed("function 'x' not found"),
    ],
    ids=["serialization-with-cause", "serialization", "deserialization", "unknown-function"],
)
def test_serialize_exception_result_invalid_request(exc: BaseException) -> None:
    blob = serialize(_result_data(exc, job_id="bad-1"))
    data = json.loads(blob)
    assert data["a"] == []
    assert data["k"] == {}
    result = result_from_blob(blob)
    assert result.status == "invalid_request"
    assert result.job_id == "bad-1"
    assert result.error is not None
    assert result.model_used == "none"


def test_unknown_function_error_names_it() -> None:
    result = exception_result(JobExecutionFailed("function 'x' not found"), "j")
    assert result.status == "invalid_request"
    assert result.error is not None
    assert "function 'x' not found" in result.error


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("worker exploded"),
        TimeoutError(),
        JobExecutionFailed("something else went wrong"),
        KeyError("k"),
    ],
)
def test_serialize_other_exceptions_are_failed(exc: BaseException) -> None:
    blob = serialize(_result_data(exc, job_id="boom-1"))
    result = result_from_blob(blob)
    assert result.status == "failed"
    assert result.job_id == "boom-1"
    assert result.error is not None
    assert type(exc).__name__ in result.error
    data = json.loads(blob)
    assert data["a"] == []
    assert data["k"] == {}


def test_serialize_through_arq_serialize_result() -> None:
    blob = serialize_result(
        "route",
        (REQUEST,),
        {},
        1,
        1,
        False,
        RuntimeError("crash"),
        2,
        3,
        "ref",
        "q",
        "job-77",
        serializer=serialize,
    )
    assert blob is not None
    result = result_from_blob(blob)
    assert result.status == "failed"
    assert result.job_id == "job-77"
    assert result.error == "RuntimeError: crash"


# --- parse_request ---------------------------------------------------------------------------


def test_parse_request_positional() -> None:
    request = parse_request((REQUEST,), {}, Settings())
    assert request.context == "unit"
    assert request.messages[0].content == "hi"


def test_parse_request_keyword() -> None:
    request = parse_request((), {"request": REQUEST}, Settings())
    assert request.context == "unit"


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((), {}),
        ((REQUEST, REQUEST), {}),
        ((REQUEST,), {"request": REQUEST}),
        ((), {"req": REQUEST}),
        ((), {"request": REQUEST, "extra": 1}),
        (("just a string",), {}),
        (([REQUEST],), {}),
        ((), {"request": None}),
    ],
)
def test_parse_request_refuses_other_shapes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - ValidationError is a ValueError too
        parse_request(args, kwargs, Settings())


def test_parse_request_validates_the_request() -> None:
    with pytest.raises(ValidationError):
        parse_request(({"messages": []},), {}, Settings())


# --- the route job ---------------------------------------------------------------------------


@pytest.fixture
def router(monkeypatch: pytest.MonkeyPatch) -> Router:
    calls: list[str] = []

    async def fake_call_model(
        cfg: ModelConfig,
        messages: list[dict[str, Any]],
        schema: dict[str, Any] | None = None,
        *,
        anthropic_max_tokens: int = 4096,
    ) -> Reply:
        calls.append(cfg.model)
        return Reply("I don't know" if cfg.model.startswith("ollama") else "the answer")

    monkeypatch.setattr(router_module, "call_model", fake_call_model)
    settings = Settings(
        chains={
            "default": [
                ModelConfig(model="ollama_chat/unit-job", timeout=1),
                ModelConfig(model="anthropic/unit-job", timeout=1),
            ]
        }
    )
    return Router(settings)


async def test_route_job_returns_ok_result_dict(router: Router) -> None:
    out = await route({"job_id": "job-1", "router": router}, REQUEST)
    assert isinstance(out, dict)
    assert out["status"] == "ok"
    assert out["content"] == "the answer"
    assert out["model_used"] == "anthropic/unit-job"
    assert out["job_id"] == "job-1"
    assert out["context"] == "unit"
    assert [a["outcome"] for a in out["attempts"]] == ["rejected", "success"]
    json.dumps(out)


async def test_route_job_keyword_request(router: Router) -> None:
    out = await route({"job_id": "job-2", "router": router}, request=REQUEST)
    assert out["status"] == "ok"
    assert out["job_id"] == "job-2"


@pytest.mark.parametrize(
    ("args", "kwargs", "needle"),
    [
        (({"messages": []},), {}, "messages"),
        (({"messages": [{"role": "user", "content": "x"}], "bogus": 1},), {}, "bogus"),
        (
            ({"messages": [{"role": "user", "content": "x"}], "schema": {"type": "objekt"}},),
            {},
            "schema",
        ),
        (("a bare string",), {}, "str"),
        ((), {}, "exactly one argument"),
        ((REQUEST, REQUEST), {}, "exactly one argument"),
    ],
)
async def test_route_job_malformed_request_is_invalid_request(
    router: Router, args: tuple[Any, ...], kwargs: dict[str, Any], needle: str
) -> None:
    out = await route({"job_id": "bad-2", "router": router}, *args, **kwargs)
    assert out["status"] == "invalid_request"
    assert out["job_id"] == "bad-2"
    assert out["model_used"] == "none"
    assert out["attempts"] == []
    assert needle in out["error"]
    assert out["error"].startswith("invalid request")


async def test_route_job_invalid_request_publishes_event_after_finish(redis: Redis) -> None:
    router = Router(Settings(), redis=redis)
    pubsub: Any = redis.pubsub()
    await pubsub.subscribe(METRICS_CHANNEL)
    try:
        assert await pubsub.get_message(timeout=1.0) is not None
        ctx: dict[str, Any] = {"job_id": "bad-3", "router": router}
        out = await route(ctx, {"messages": []})
        # Nothing yet: the daemon records metrics once the result is stored.
        early = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
        await ctx["after_finish"].pop("bad-3")()
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
    finally:
        await pubsub.aclose()
    assert out["status"] == "invalid_request"
    assert early is None
    assert message is not None
    event = json.loads(message["data"])
    assert event["job_id"] == "bad-3"
    assert event["status"] == "invalid_request"


# --- worker wiring ---------------------------------------------------------------------------


def test_worker_settings_use_the_json_codec() -> None:
    settings = Settings(queue_name="q-unit", max_jobs=3)
    ws = worker_settings(settings)
    assert ws["job_serializer"] is serialize
    decode = ws["job_deserializer"]
    assert decode.func is deserialize
    assert decode.keywords == {"max_bytes": settings.max_request_bytes}
    assert ws["max_tries"] == settings.max_tries
    assert ws["job_completion_wait"] == settings.shutdown_grace
    assert ws["lease_seconds"] == settings.lease_seconds
    assert ws["queue_name"] == "q-unit"
    assert ws["max_jobs"] == 3
    assert ws["job_timeout"] == settings.job_timeout
    assert ws["functions"][0].name == JOB_FUNCTION
    assert ws["functions"][0].timeout_s == settings.job_timeout


def test_redis_settings_unquotes_credentials_and_reads_tls() -> None:
    rs = redis_settings(
        "rediss://us%40er:p%40ss%2Fword@example.org:6380/2?ssl_cert_reqs=none&ssl_ca_certs=/ca.pem"
    )
    assert rs.host == "example.org"
    assert rs.port == 6380
    assert rs.database == 2
    assert rs.ssl is True
    assert rs.username == "us@er"
    assert rs.password == "p@ss/word"
    assert rs.ssl_cert_reqs == "none"
    assert rs.ssl_ca_certs == "/ca.pem"


# --- hostile and broken input ----------------------------------------------------------------


def _job(**fields: Any) -> dict[str, Any]:
    return {"t": 1, "f": "route", "a": [{"messages": [{"role": "user", "content": "x"}]}],
            "k": {}, "et": 1, **fields}  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({"f": 7}, "'f'"),
        ({"a": "text"}, "'a'"),
        ({"k": [1]}, "'k'"),
        ({"et": "yesterday"}, "'et'"),
        ({"et": -5}, "'et'"),
        ({"et": True}, "'et'"),
        ({"t": 999}, "'t'"),
        ({"t": "1"}, "'t'"),
    ],
)
def test_job_blobs_arq_would_choke_on_are_refused(fields: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        deserialize(json.dumps(_job(**fields)).encode())


@pytest.mark.parametrize(
    ("blob", "complaint"),
    [
        ({"t": "x", "f": "route", "a": [], "k": {}, "et": 1, "r": None}, "'t'"),
        ({"f": "route", "a": [], "k": {}, "et": 1}, "has no 't'"),
        ([1, 2, 3], "JSON object, not list"),
        ("text", "JSON object, not str"),
    ],
)
def test_job_shape_errors_say_what_is_wrong(blob: Any, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        deserialize(json.dumps(blob).encode())


def test_a_well_formed_job_blob_passes() -> None:
    assert deserialize(json.dumps(_job(t=None)).encode())["f"] == "route"


def test_oversized_job_is_refused_before_parsing() -> None:
    blob = json.dumps(_job(a=[{"messages": [{"role": "user", "content": "x" * 5000}]}])).encode()
    with pytest.raises(ValueError, match="max_request_bytes"):
        deserialize(blob, max_bytes=4096)
    assert deserialize(blob, max_bytes=len(blob))["f"] == "route"


async def test_too_many_messages_and_too_big_schema_are_invalid_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = Settings(max_messages=2, max_schema_bytes=100)
    router = Router(settings)
    ctx: dict[str, Any] = {"job_id": "lim-1", "router": router}
    msgs = [{"role": "user", "content": str(n)} for n in range(3)]
    out = await route(ctx, {"messages": msgs})
    assert out["status"] == "invalid_request"
    assert "max_messages" in out["error"]
    big = {"type": "object", "properties": {f"p{n}": {"type": "string"} for n in range(20)}}
    out = await route(ctx, {"messages": msgs[:1], "schema": big})
    assert out["status"] == "invalid_request"
    assert "max_schema_bytes" in out["error"]


def test_a_poison_job_gets_a_clear_failed_result() -> None:
    result = exception_result(JobExecutionFailed("max 3 retries exceeded"), "p1")
    assert result.status == "failed"
    assert result.error is not None
    assert "not tried again" in result.error
