"""The wire protocol: request validation, the JSON job blob, result decoding, schema cache."""

from __future__ import annotations

import json
import pickle
from typing import Any

import pytest
from pydantic import ValidationError

from llm_router.client.keys import job_key, result_key
from llm_router.client.protocol import (
    JOB_FUNCTION,
    PROTOCOL_VERSION,
    Attempt,
    RouteRequest,
    RouteResult,
    decode,
    encode,
    job_blob,
    result_from_blob,
)
from llm_router.client.schemas import InvalidSchemaError, canonical_json, compile_schema
from tests.unit.blobs import result_blob

USER = {"role": "user", "content": "hello"}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["action"],
    "properties": {"action": {"type": "string"}},
}


def test_minimal_request_has_defaults() -> None:
    req = RouteRequest.model_validate({"messages": [USER]})
    assert req.chain is None
    assert req.json_schema is None
    assert req.context is None
    assert req.metadata == {}
    assert req.messages[0].role == "user"
    assert req.messages[0].content == "hello"


def test_a_request_is_version_1_with_or_without_v() -> None:
    assert RouteRequest.model_validate({"messages": [USER]}).v == 1
    request = RouteRequest.model_validate({"v": 1, "messages": [USER]})
    assert request.v == 1
    assert "v" not in request.wire()  # what workers from before `v` read too


@pytest.mark.parametrize("v", [999, 0, "1", True, None, 1.5])
def test_an_unsupported_version_is_named_before_anything_else(v: object) -> None:
    # A newer request may carry fields this version forbids: the version is reported.
    with pytest.raises(ValidationError) as info:
        RouteRequest.model_validate({"v": v, "messages": [USER], "from_the_future": 1})
    [error] = info.value.errors()  # the version alone, not the unknown field
    assert error["msg"].startswith("Value error, unsupported protocol version ")
    assert error["msg"].endswith(" (supported: 1, 2, 3)")


def test_cache_ttl_is_a_version_3_field() -> None:
    request = RouteRequest.model_validate({"v": 3, "messages": [USER], "cache_ttl": 60})
    assert (request.v, request.cache_ttl) == (3, 60)
    assert request.wire()["v"] == 3
    for v in (1, 2):
        with pytest.raises(
            ValidationError, match='cache_ttl needs protocol version 3: send "v": 3'
        ):
            RouteRequest.model_validate({"v": v, "messages": [USER], "cache_ttl": 60})


def test_expires_in_is_a_version_2_field() -> None:
    request = RouteRequest.model_validate({"v": 2, "messages": [USER], "expires_in": 30})
    assert (request.v, request.expires_in) == (2, 30)
    assert request.wire()["v"] == 2
    with pytest.raises(ValidationError, match="needs protocol version 2"):
        RouteRequest.model_validate({"messages": [USER], "expires_in": 30})
    for bad in (0, -1, 86_401):
        with pytest.raises(ValidationError):
            RouteRequest.model_validate({"v": 2, "messages": [USER], "expires_in": bad})
    # Version 2 without a version 2 field is fine, and travels as it came.
    assert RouteRequest.model_validate({"v": 2, "messages": [USER]}).wire()["v"] == 2


def test_request_without_messages_is_refused() -> None:
    with pytest.raises(ValidationError) as info:
        RouteRequest.model_validate({"messages": []})
    assert info.value.errors()[0]["loc"] == ("messages",)
    with pytest.raises(ValidationError):
        RouteRequest.model_validate({})


def test_bad_role_is_refused() -> None:
    with pytest.raises(ValidationError) as info:
        RouteRequest.model_validate({"messages": [{"role": "wizard", "content": "x"}]})
    assert info.value.errors()[0]["loc"] == ("messages", 0, "role")


def test_extra_top_level_field_is_forbidden() -> None:
    with pytest.raises(ValidationError) as info:
        RouteRequest.model_validate({"messages": [USER], "temperature": 0.2})
    err = info.value.errors()[0]
    assert err["type"] == "extra_forbidden"
    assert err["loc"] == ("temperature",)


def test_extra_message_keys_pass_through() -> None:
    req = RouteRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi", "name": "bob"}]}
    )
    assert req.wire()["messages"][0] == {"role": "user", "content": "hi", "name": "bob"}


def test_schema_alias_round_trips_through_wire() -> None:
    req = RouteRequest.model_validate({"messages": [USER], "schema": SCHEMA, "context": "c"})
    assert req.json_schema == SCHEMA
    wire = req.wire()
    assert wire["schema"] == SCHEMA
    assert "json_schema" not in wire
    again = RouteRequest.model_validate(wire)
    assert again == req
    # The Python name works too.
    by_name = RouteRequest.model_validate({"messages": [USER], "json_schema": SCHEMA})
    assert by_name.wire()["schema"] == SCHEMA


def test_wire_drops_unset_optionals() -> None:
    wire = RouteRequest.model_validate({"messages": [USER]}).wire()
    assert "schema" not in wire
    assert "context" not in wire
    assert "chain" not in wire  # the worker picks the lane's chain


def test_wire_is_json_serialisable() -> None:
    req = RouteRequest.model_validate({"messages": [USER], "schema": SCHEMA, "metadata": {"n": 1}})
    assert json.loads(json.dumps(req.wire())) == req.wire()


def test_invalid_json_schema_is_refused_with_message() -> None:
    with pytest.raises(ValidationError) as info:
        RouteRequest.model_validate({"messages": [USER], "schema": {"type": "objekt"}})
    err = info.value.errors()[0]
    assert err["loc"] == ("schema",)
    assert "invalid JSON Schema" in err["msg"]
    assert "objekt" in err["msg"]
    cause = err["ctx"]["error"]
    assert isinstance(cause, InvalidSchemaError)


def test_compile_schema_raises_invalid_schema_error() -> None:
    with pytest.raises(InvalidSchemaError, match="invalid JSON Schema"):
        compile_schema({"type": "objekt"})
    with pytest.raises(InvalidSchemaError, match="JSON object"):
        compile_schema([1, 2])


def test_context_too_long_is_refused() -> None:
    RouteRequest.model_validate({"messages": [USER], "context": "x" * 200})
    with pytest.raises(ValidationError) as info:
        RouteRequest.model_validate({"messages": [USER], "context": "x" * 201})
    assert info.value.errors()[0]["loc"] == ("context",)


def test_empty_chain_name_is_refused() -> None:
    with pytest.raises(ValidationError):
        RouteRequest.model_validate({"messages": [USER], "chain": ""})


def test_job_blob_is_json_arq_job() -> None:
    req = RouteRequest.model_validate({"messages": [USER], "schema": SCHEMA, "context": "ctx"})
    blob = job_blob(req, 1234)
    assert isinstance(blob, bytes)
    data = json.loads(blob)
    assert set(data) == {"t", "f", "a", "k", "et"}
    assert data["t"] == 1
    assert data["f"] == JOB_FUNCTION == "route"
    assert data["k"] == {}
    assert data["et"] == 1234
    assert len(data["a"]) == 1
    assert data["a"][0] == req.wire()
    assert RouteRequest.model_validate(data["a"][0]) == req


def test_key_names() -> None:
    assert job_key("abc") == "arq:job:abc"
    assert result_key("abc") == "arq:result:abc"


def test_encode_is_compact_utf8() -> None:
    blob = encode({"a": "zażółć", "b": [1, 2]})
    assert blob == '{"a":"zażółć","b":[1,2]}'.encode()
    assert decode(blob) == {"a": "zażółć", "b": [1, 2]}


def test_result_from_blob_reads_protocol_result() -> None:
    original = RouteResult(
        status="ok",
        content={"action": "go"},
        raw_text='{"action": "go"}',
        model_used="m1",
        attempts=[Attempt(model="m1", outcome="success", latency_ms=5)],
        latency_ms=7,
        job_id="j1",
        context="c",
        chain="default",
    )
    result = result_from_blob(result_blob(original.model_dump(mode="json")))
    assert result == original
    assert result.ok
    assert result.v == PROTOCOL_VERSION
    assert result.attempts[0].model == "m1"


def test_result_from_blob_ignores_unknown_result_fields() -> None:
    result = result_from_blob(result_blob({"status": "failed", "future_field": 1}))
    assert result.status == "failed"
    assert not result.ok


def test_result_from_blob_non_protocol_result_is_failed() -> None:
    result = result_from_blob(result_blob("unable to serialize result", job_id="j9"))
    assert result.status == "failed"
    assert not result.ok
    assert result.job_id == "j9"
    assert result.error is not None
    assert "non-protocol" in result.error
    assert "unable to serialize result" in result.error
    assert result.model_used == "none"


def test_result_from_blob_dict_without_status_is_failed() -> None:
    result = result_from_blob(result_blob({"answer": 42}))
    assert result.status == "failed"
    assert result.error is not None
    assert "answer" in result.error


def test_result_from_blob_non_object_blob_is_failed() -> None:
    result = result_from_blob(b"[1, 2, 3]")
    assert result.status == "failed"
    assert result.job_id is None


def test_canonical_json_is_key_order_independent() -> None:
    a = {"type": "object", "properties": {"x": {"type": "string"}, "a": {"type": "integer"}}}
    b = {"properties": {"a": {"type": "integer"}, "x": {"type": "string"}}, "type": "object"}
    assert list(a) != list(b)
    assert canonical_json(a) == canonical_json(b)
    assert canonical_json({"x": 1}) != canonical_json({"x": 2})
    assert json.loads(canonical_json(a)) == a


def test_compile_schema_caches_validators() -> None:
    schema_a = {"type": "object", "properties": {"cache_probe": {"type": "integer"}}}
    schema_b = {"properties": {"cache_probe": {"type": "integer"}}, "type": "object"}
    first = compile_schema(schema_a).validator
    second = compile_schema(schema_b).validator
    assert first is second
    other = compile_schema({"type": "array"}).validator
    assert other is not first
    assert first.is_valid({"cache_probe": 1})
    assert not first.is_valid({"cache_probe": "one"})


def test_compiled_validator_checks_formats() -> None:
    validator = compile_schema({"type": "string", "format": "date"}).validator
    assert validator.is_valid("2024-01-31")
    assert not validator.is_valid("not a date")


@pytest.mark.parametrize(
    "blob",
    [
        result_blob({"status": "done", "content": "x"}),
        result_blob(
            {
                "v": 2,
                "status": "failed",
                "attempts": [{"model": "m", "outcome": "timeout", "latency_ms": 1}],
            }
        ),
        pickle.dumps({"r": {"status": "ok"}, "id": "j1"}),
    ],
    ids=["unknown-status", "unknown-attempt-outcome", "pickled-result-blob"],
)
def test_result_from_blob_malformed_payload_is_failed_not_raised(blob: bytes) -> None:
    # The documented contract: "a non-protocol payload becomes a ``failed`` result".
    result = result_from_blob(blob)
    assert result.status == "failed"
    assert not result.ok
    assert result.error is not None
