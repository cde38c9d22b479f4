"""The arq side: the JSON job codec (never pickle), request parsing and the ``route`` job."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
from arq.jobs import deserialize_job_raw, deserialize_result
from pydantic import ValidationError
from redis.asyncio import Redis

from llm_router.client.keys import METRICS_CHANNEL
from llm_router.client.protocol import (
    JOB_FUNCTION,
    RouteRequest,
    RouteResult,
    job_blob,
    result_from_blob,
)
from llm_router.worker import router as router_module
from llm_router.worker.calls import Reply
from llm_router.worker.jobs import (
    Finished,
    RouteJobs,
    UnreadableJob,
    decode_job,
    parse_request,
)
from llm_router.worker.router import Router
from llm_router.worker.settings import ModelConfig, Settings
from llm_router_testing.inproc import claimed
from llm_router_testing.inproc import job_blob as inproc_blob

REQUEST: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "context": "unit"}


class _WritesMarker:
    """Unpickling this creates a file: proof that a payload was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


# --- decode_job ------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL])
def test_decode_job_refuses_pickle_without_loading(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    blob = pickle.dumps({"t": 1, "f": "route", "a": [_WritesMarker(marker)]}, protocol=protocol)
    with pytest.raises(UnreadableJob, match="pickle"):
        decode_job(blob)
    assert not marker.exists()
    # The payload is live: loading it the way arq would by default does run it.
    loaded = pickle.loads(blob)
    loaded["a"][0].close()
    assert marker.exists()


def test_decode_job_refuses_old_protocol_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "pwned0"
    blob = pickle.dumps(_WritesMarker(marker), protocol=0)
    with pytest.raises(UnreadableJob):
        decode_job(blob)
    assert not marker.exists()


def test_decode_job_reads_the_client_job_blob_as_arq_does() -> None:
    request = RouteRequest.model_validate({**REQUEST, "schema": {"type": "object"}})
    blob = job_blob(request, 42)
    data = decode_job(blob)
    assert data["a"] == [request.wire()]
    assert (data["f"], data["k"], data["et"]) == (JOB_FUNCTION, {}, 42)
    # arq's own reader makes the same of it (with a JSON deserializer).
    function, args, kwargs, job_try, enqueue_ms = deserialize_job_raw(blob, deserializer=json.loads)
    assert (function, list(args), kwargs, job_try, enqueue_ms) == (
        JOB_FUNCTION,
        data["a"],
        data["k"],
        1,
        42,
    )


# --- the result blob -------------------------------------------------------------------------


def test_the_result_blob_is_arqs_without_the_request() -> None:
    result = RouteResult(status="ok", content="hello", model_used="m", job_id="job-9")
    finished = Finished(result, True, function="route", enqueued_ms=7)
    job = claimed("job-9", job_blob(RouteRequest.model_validate(REQUEST), 7), tries=2)
    blob = finished.blob(job, started_ms=11)
    data = json.loads(blob)
    assert set(data) == {"t", "f", "a", "k", "et", "s", "r", "st", "ft", "q", "id"}
    assert (data["t"], data["f"], data["a"], data["k"], data["et"]) == (2, "route", [], {}, 7)
    assert (data["s"], data["st"], data["id"], data["q"]) == (True, 11, "job-9", job.lane.name)
    assert data["ft"] >= 11
    assert "hi" not in blob.decode()  # the prompt is not copied back
    assert result_from_blob(blob) == result
    # arq's own reader takes it as a job result.
    read = deserialize_result(blob, deserializer=json.loads)
    assert (read.success, read.job_try, read.function) == (True, 2, "route")
    assert read.result["content"] == "hello"


def test_a_crashed_job_is_a_failed_result_that_names_the_error() -> None:
    settings = Settings()
    finished = RouteJobs(Router(settings), settings).crashed(
        claimed("boom-1", None), RuntimeError("worker exploded")
    )
    blob = finished.blob(claimed("boom-1", None), started_ms=1)
    result = result_from_blob(blob)
    assert (result.status, result.job_id) == ("failed", "boom-1")
    assert result.error == "RuntimeError: worker exploded"
    assert json.loads(blob)["s"] is False


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
    async def fake_call_model(
        cfg: ModelConfig,
        messages: list[dict[str, Any]],
        schema: dict[str, Any] | None = None,
        *,
        anthropic_max_tokens: int = 4096,
    ) -> Reply:
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


async def run_job(router: Router, job_id: str, blob: bytes) -> Finished:
    finished = await RouteJobs(router, router.settings).run(claimed(job_id, blob))
    assert isinstance(finished, Finished), finished
    return finished


async def test_route_job_routes_and_returns_its_result(router: Router) -> None:
    finished = await run_job(router, "job-1", inproc_blob(REQUEST))
    out = finished.result.model_dump(mode="json")
    assert (finished.success, finished.announce, finished.function) == (True, True, "route")
    assert out["status"] == "ok"
    assert out["content"] == "the answer"
    assert out["model_used"] == "anthropic/unit-job"
    assert out["job_id"] == "job-1"
    assert out["context"] == "unit"
    assert [a["outcome"] for a in out["attempts"]] == ["rejected", "success"]
    json.dumps(out)


async def test_route_job_keyword_request_and_reply_list(router: Router) -> None:
    blob = json.dumps(
        {"t": 1, "f": "route", "a": [], "et": 1,
         "k": {"request": REQUEST, "reply_to": "llm_router:reply:me"}}
    ).encode()  # fmt: skip
    finished = await run_job(router, "job-2", blob)
    assert finished.result.status == "ok"
    assert finished.result.job_id == "job-2"
    assert finished.reply_to == "llm_router:reply:me"


@pytest.mark.parametrize(
    ("args", "kwargs", "needle"),
    [
        ([{"messages": []}], {}, "messages"),
        ([{"messages": [{"role": "user", "content": "x"}], "bogus": 1}], {}, "bogus"),
        (
            [{"messages": [{"role": "user", "content": "x"}], "schema": {"type": "objekt"}}],
            {},
            "schema",
        ),
        (["a bare string"], {}, "str"),
        ([], {}, "exactly one argument"),
        ([REQUEST, REQUEST], {}, "exactly one argument"),
    ],
)
async def test_route_job_malformed_request_is_invalid_request(
    router: Router, args: list[Any], kwargs: dict[str, Any], needle: str
) -> None:
    blob = json.dumps({"t": 1, "f": "route", "a": args, "k": kwargs, "et": 1}).encode()
    out = (await run_job(router, "bad-2", blob)).result.model_dump(mode="json")
    assert out["status"] == "invalid_request"
    assert out["job_id"] == "bad-2"
    assert out["model_used"] == "none"
    assert out["attempts"] == []
    assert needle in out["error"]
    assert out["error"].startswith("invalid request")


async def test_route_job_invalid_request_is_announced_only_after_the_store(redis: Redis) -> None:
    router = Router(Settings(), redis=redis)
    pubsub: Any = redis.pubsub()
    await pubsub.subscribe(METRICS_CHANNEL)
    try:
        assert await pubsub.get_message(timeout=1.0) is not None
        finished = await run_job(router, "bad-3", inproc_blob({"messages": []}))
        # Nothing yet: the loop records metrics once the result is stored.
        early = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
        assert finished.after_store is not None
        await finished.after_store()
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
    finally:
        await pubsub.aclose()
    assert finished.result.status == "invalid_request"
    assert finished.announce
    assert early is None
    assert message is not None
    event = json.loads(message["data"])
    assert event["job_id"] == "bad-3"
    assert event["status"] == "invalid_request"


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
        decode_job(json.dumps(_job(**fields)).encode())


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
        decode_job(json.dumps(blob).encode())


def test_a_well_formed_job_blob_passes() -> None:
    assert decode_job(json.dumps(_job(t=None)).encode())["f"] == "route"


def test_oversized_job_is_refused_before_parsing() -> None:
    blob = json.dumps(_job(a=[{"messages": [{"role": "user", "content": "x" * 5000}]}])).encode()
    with pytest.raises(ValueError, match="max_request_bytes"):
        decode_job(blob, max_bytes=4096)
    assert decode_job(blob, max_bytes=len(blob))["f"] == "route"


async def test_too_many_messages_and_too_big_schema_are_invalid_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    router = Router(Settings(max_messages=2, max_schema_bytes=100))
    msgs = [{"role": "user", "content": str(n)} for n in range(3)]
    out = (await run_job(router, "lim-1", inproc_blob({"messages": msgs}))).result
    assert out.status == "invalid_request"
    assert "max_messages" in (out.error or "")
    big = {"type": "object", "properties": {f"p{n}": {"type": "string"} for n in range(20)}}
    blob = inproc_blob({"messages": msgs[:1], "schema": big})
    out = (await run_job(router, "lim-1", blob)).result
    assert out.status == "invalid_request"
    assert "max_schema_bytes" in (out.error or "")


async def test_a_poison_job_gets_a_clear_failed_result(router: Router) -> None:
    jobs = RouteJobs(router, router.settings)
    finished = await jobs.run(claimed("p1", inproc_blob(REQUEST), tries=4))
    assert isinstance(finished, Finished), finished
    assert finished.result.status == "failed"
    assert finished.result.error is not None
    assert "started too often" in finished.result.error
    assert "not tried again" in finished.result.error
