"""The shipped JSON Schemas: generated from the models, they cannot drift from them;
what the real code produces fits them, and docs/protocol.md's examples too."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from llm_router.client import wire
from llm_router.client.client import build_request
from llm_router.client.events import MetricsEvent
from llm_router.client.protocol import Attempt, RouteRequest, RouteResult, result_from_blob
from llm_router.worker.jobs import RouteJobs
from llm_router.worker.metrics import Metrics, event_payload
from llm_router.worker.router import Router, invalid_result
from llm_router.worker.settings import Settings
from llm_router_testing.inproc import claimed

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL_DOC = ROOT / "docs" / "protocol.md"
USER = {"role": "user", "content": "hello"}


def validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(wire.schema(name))


def errors(name: str, instance: Any) -> list[str]:
    return [e.message for e in validator(name).iter_errors(instance)]


# --- the files cannot drift --------------------------------------------------------


@pytest.mark.parametrize("name", wire.NAMES)
def test_shipped_file_is_what_the_models_generate(name: str) -> None:
    shipped = (Path(wire.__file__).parent / wire.file_name(name)).read_text(encoding="utf-8")
    assert shipped == wire.render(name), (
        f"{wire.file_name(name)} is stale: run `python -m llm_router.client.wire`"
    )
    assert wire.schema(name) == wire.generate(name)


def test_check_mode_reports_stale_files(tmp_path: Path) -> None:
    assert wire.stale() == []
    assert wire.main(["--check"]) == 0
    wire.write(tmp_path)
    assert wire.stale(tmp_path) == []
    (tmp_path / wire.file_name("result")).write_text("{}\n", encoding="utf-8")
    (tmp_path / wire.file_name("request")).unlink()
    assert wire.stale(tmp_path) == ["request", "result"]


@pytest.mark.parametrize("name", wire.NAMES)
def test_schema_is_a_valid_2020_12_schema_with_an_id(name: str) -> None:
    loaded = wire.schema(name)
    Draft202012Validator.check_schema(loaded)
    assert loaded["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert loaded["$id"] == f"urn:llm-router:protocol:v3:{name}"


def test_unknown_schema_name_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown schema"):
        wire.schema("job")
    with pytest.raises(ValueError, match="unknown schema"):
        wire.generate("../request")


# --- results -------------------------------------------------------------------


def full_result() -> RouteResult:
    return RouteResult(
        status="ok",
        content={"answer": "yes"},
        raw_text='{"answer": "yes"}',
        model_used="anthropic/claude-haiku-4-5-20251001",
        attempts=[
            Attempt(
                model="ollama_chat/qwen2.5:7b",
                outcome="rejected",
                reason="RefusalPattern matched: 'I cannot'",
                latency_ms=378,
                load_ms=1,
                input_tokens=15,
                output_tokens=9,
                cache_read_input_tokens=0,
                cache_creation_input_tokens=0,
            ),
            Attempt(
                model="anthropic/claude-sonnet-4-6", outcome="skipped", reason="busy", latency_ms=0
            ),
            Attempt(
                model="anthropic/claude-haiku-4-5-20251001",
                outcome="success",
                latency_ms=67,
                retries=1,
                retry_error="RateLimitError: 429",
                input_tokens=16,
                output_tokens=24,
                cost_usd=0.000136,
            ),
        ],
        latency_ms=446,
        chain_ms=445.9,
        job_id="af348e31fd4549cc81c24ff5202efdd2",
        context="billing.backfill",
        chain="default",
        metadata={"invoice": 7, "tags": ["a", None]},
        cost_usd=0.000136,
    )


def produced_results() -> list[RouteResult]:
    request = build_request("hi", context="svc", chain="cheap")
    return [
        full_result(),
        RouteResult(status="failed", error="every model failed"),
        invalid_result("unknown chain 'nope'", request, job_id="j1"),
        invalid_result("invalid request: messages: Field required", job_id="j2"),
        RouteJobs(Router(Settings()), Settings())
        .crashed(claimed("j3", None), ValueError("boom"))
        .result,
        result_from_blob(b"\x80\x03pickle"),
        result_from_blob(b'{"r": 5, "id": "j4"}'),
    ]


@pytest.mark.parametrize("result", produced_results())
def test_results_the_code_produces_fit_the_schema(result: RouteResult) -> None:
    assert errors("result", result.model_dump(mode="json")) == []


def test_result_schema_refuses_what_a_result_cannot_be() -> None:
    good = full_result().model_dump(mode="json")
    assert errors("result", {**good, "status": "maybe"})
    assert errors("result", {**good, "latency_ms": "fast"})
    assert errors("result", {k: v for k, v in good.items() if k != "status"})
    assert errors("result", {**good, "attempts": [{"model": "m", "outcome": "won"}]})


# --- the metrics event ---------------------------------------------------------


def test_event_payload_fits_the_schema_and_the_model() -> None:
    snapshot = {
        "ollama_chat/qwen2.5:7b": {"success": 3, "fallback": 1, "error": 0, "skipped": 2},
        "anthropic/claude-haiku-4-5-20251001": {
            "success": 1,
            "fallback": 0,
            "error": 0,
            "skipped": 0,
        },
    }
    breakers = {"ollama_chat/qwen2.5:7b": "closed", "anthropic/claude-sonnet-4-6": "half_open"}
    for result in [*produced_results(), full_result()]:
        event = json.loads(json.dumps(event_payload(result, snapshot, breakers)))
        assert errors("metrics_event", event) == []
        assert set(event) == set(MetricsEvent.model_fields), "event and model disagree"
        MetricsEvent.model_validate(event)
    assert errors("metrics_event", event_payload(RouteResult(status="failed"), {})) == []


async def test_a_recorded_event_fits_the_schema() -> None:
    metrics = Metrics(None)
    event = await metrics.record(full_result(), {"ollama_chat/qwen2.5:7b": "open"})
    assert event is not None
    assert errors("metrics_event", json.loads(json.dumps(event))) == []
    assert event["metrics_snapshot"]["ollama_chat/qwen2.5:7b"]["fallback"] == 1


def test_event_schema_refuses_what_an_event_cannot_be() -> None:
    good = event_payload(full_result(), {}, {"m": "closed"})
    assert errors("metrics_event", {**good, "breakers": {"m": "ajar"}})
    assert errors("metrics_event", {**good, "metrics_snapshot": {"m": {"success": 1}}})
    assert errors("metrics_event", {k: v for k, v in good.items() if k != "timestamp"})


# --- requests ------------------------------------------------------------------

ACCEPTED: list[dict[str, Any]] = [
    {"messages": [USER]},
    {"v": 1, "messages": [USER]},
    {
        "v": 1,
        "messages": [
            {"role": "system", "content": "Answer in JSON."},
            {"role": "user", "content": [{"type": "text", "text": "Is water wet?"}]},
            {"role": "assistant", "content": "ok", "name": "bot"},
            {"role": "tool", "content": "{}", "tool_call_id": "c1"},
        ],
        "schema": {"type": "object", "properties": {"answer": {"type": "string"}}},
        "context": "billing.backfill",
        "chain": "default",
        "metadata": {"invoice": 7, "nested": {"a": [1, 2]}},
    },
    {"messages": [USER], "schema": None, "context": None, "chain": None},
    build_request("hi", context="svc", chain="cheap", metadata={"k": 1}).wire(),
    {"v": 2, "messages": [USER], "expires_in": 12.5},
    build_request("hi", expires_in=30).wire(),
    {"v": 3, "messages": [USER], "cache_ttl": 0},
    {"v": 3, "messages": [USER], "cache_ttl": 2_592_000, "expires_in": 5},
    build_request("hi", cache_ttl=3600).wire(),
]

REFUSED: list[dict[str, Any]] = [
    {},
    {"messages": []},
    {"messages": "hello"},
    {"messages": [{"role": "robot", "content": "hi"}]},
    {"messages": [{"role": "user"}]},
    {"messages": [{"role": "user", "content": 5}]},
    {"messages": [USER], "prompt": "hi"},
    {"messages": [USER], "v": 4},
    {"messages": [USER], "expires_in": 30},
    {"messages": [USER], "cache_ttl": 60},
    {"messages": [USER], "v": 2, "cache_ttl": 60},
    {"messages": [USER], "v": 3, "cache_ttl": -1},
    {"messages": [USER], "v": 3, "cache_ttl": 2_592_001},
    {"messages": [USER], "v": 3, "cache_ttl": 1.5},
    {"messages": [USER], "v": 2, "expires_in": 0},
    {"messages": [USER], "v": "1"},
    {"messages": [USER], "context": "x" * 201},
    {"messages": [USER], "chain": ""},
    {"messages": [USER], "chain": "c" * 101},
    {"messages": [USER], "schema": "a string"},
    {"messages": [USER], "metadata": []},
]


@pytest.mark.parametrize("request_", ACCEPTED)
def test_requests_pydantic_accepts_fit_the_schema(request_: dict[str, Any]) -> None:
    RouteRequest.model_validate(request_)
    assert errors("request", request_) == []


@pytest.mark.parametrize("request_", REFUSED)
def test_requests_pydantic_refuses_are_refused_by_the_schema(request_: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        RouteRequest.model_validate(request_)
    assert errors("request", request_), f"the schema accepts {request_!r}"


# --- docs/protocol.md ----------------------------------------------------------

EXAMPLE = re.compile(r"<!--\s*schema:\s*([a-z_]+)\s*-->\s*\n```json\n(.*?)\n```", re.DOTALL)


def doc_examples() -> list[tuple[str, str]]:
    return EXAMPLE.findall(PROTOCOL_DOC.read_text(encoding="utf-8"))


def test_the_document_has_examples_of_every_schema() -> None:
    names = [name for name, _ in doc_examples()]
    assert set(names) <= set(wire.NAMES), f"unknown schema in docs/protocol.md: {names}"
    for name in wire.NAMES:
        assert names.count(name) >= 3, f"docs/protocol.md has too few {name} examples"


@pytest.mark.parametrize(
    ("name", "text"), doc_examples(), ids=lambda v: v if v in wire.NAMES else ""
)
def test_document_example_fits_its_schema(name: str, text: str) -> None:
    instance = json.loads(text)
    assert errors(name, instance) == []
    if name == "request":
        RouteRequest.model_validate(instance)
    elif name == "result":
        RouteResult.model_validate(instance)
    else:
        MetricsEvent.model_validate(instance)
