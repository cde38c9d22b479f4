"""The stub's Message Batches routes, driven by Anthropic's own SDK.

What a batch client meets at the real service: a batch that ends later, rows out of
request order that are ``succeeded``, ``errored``, ``canceled`` or ``expired``, refusals of
the batch's shape at creation, 404s for unknown batches; every row a ``Message`` the
real-time route would have given, and no real-time call made for any of it. The SDK's
models validate every object (``_strict_response_validation``), and the results file's
lines, which the SDK decodes without validating, are validated here.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import anthropic
import httpx
import pytest
from anthropic.types import Message
from anthropic.types.messages import (
    MessageBatch,
    MessageBatchCanceledResult,
    MessageBatchErroredResult,
    MessageBatchExpiredResult,
    MessageBatchIndividualResponse,
    MessageBatchSucceededResult,
)
from anthropic.types.messages.batch_create_params import Request

from llm_router_testing.stubs import PARTIAL_REFUSAL_TEXT, REFUSAL_DETAILS, StubServer

pytestmark = pytest.mark.integration

HAIKU = "claude-haiku-4-5-20251001"
SONNET = "claude-sonnet-4-6"
HEADERS = {"x-api-key": "test", "anthropic-version": "2023-06-01"}


def request(custom_id: str, text: str, model: str = HAIKU, **params: Any) -> Request:
    """One batch request; ``params`` override the Messages API params (malformed ones too)."""
    body = {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": text}]}
    return cast(Request, {"custom_id": custom_id, "params": {**body, **params}})


@pytest.fixture
def server() -> Iterator[StubServer]:
    """A stub of this test's own: its behaviours, batches and switches are the test's."""
    with StubServer(batch_seconds=0.3) as stub:
        yield stub


@pytest.fixture
async def client(server: StubServer) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(
        base_url=server.url, api_key="test", max_retries=0, _strict_response_validation=True
    ) as sdk:
        yield sdk


async def ended(
    client: anthropic.AsyncAnthropic, batch_id: str, timeout: float = 10.0
) -> MessageBatch:
    """Poll as a batch client does until the batch has ended."""
    deadline = time.monotonic() + timeout
    while True:
        batch = await client.messages.batches.retrieve(batch_id)
        if batch.processing_status == "ended":
            return batch
        assert time.monotonic() < deadline, f"{batch_id} still {batch.processing_status}"
        await asyncio.sleep(0.05)


async def results(
    client: anthropic.AsyncAnthropic, batch_id: str
) -> list[MessageBatchIndividualResponse]:
    """The rows through the SDK's ``results()`` (which finds ``results_url`` itself)."""
    return [row async for row in await client.messages.batches.results(batch_id)]


async def get(url: str, **headers: str) -> httpx.Response:
    """A plain GET with the API's headers, as a client without the SDK sends it."""
    async with httpx.AsyncClient() as http:
        return await http.get(url, headers={**HEADERS, **headers})


async def raw_rows(batch: MessageBatch) -> list[MessageBatchIndividualResponse]:
    """The results file's lines, each validated against the SDK's model."""
    assert batch.results_url is not None
    response = await get(batch.results_url)
    assert response.status_code == 200
    return [
        MessageBatchIndividualResponse.model_validate(json.loads(line))
        for line in response.text.splitlines()
    ]


def real_time_calls(server: StubServer) -> list[str]:
    return [r.path for r in server.requests if r.path == "/v1/messages"]


async def test_a_batch_ends_with_the_real_time_answers(
    server: StubServer, client: anthropic.AsyncAnthropic
) -> None:
    requests = [
        request("plain", "hello there"),
        request("as-json", "stub:*=json"),
        request("refused", "stub:*=provider_refusal"),
        request("cut_short", "a long story " * 20, max_tokens=5),
        request("sonnet-1", "hello sonnet", model=SONNET),
    ]
    created = await client.messages.batches.create(requests=requests)

    assert created.id.startswith("msgbatch_")
    assert created.type == "message_batch"
    assert created.processing_status == "in_progress"
    assert created.request_counts.model_dump() == {
        "processing": 5,
        "succeeded": 0,
        "errored": 0,
        "canceled": 0,
        "expired": 0,
    }
    assert (created.expires_at - created.created_at).total_seconds() == 24 * 3600
    assert (created.ended_at, created.cancel_initiated_at, created.archived_at) == (None,) * 3
    assert created.results_url is None

    batch = await ended(client, created.id)
    rows = await results(client, created.id)
    by_id = {row.custom_id: row.result for row in rows}

    assert batch.ended_at is not None
    assert batch.ended_at > batch.created_at
    assert batch.request_counts.succeeded == 5
    assert batch.request_counts.processing == 0
    assert batch.results_url == f"{server.url}/v1/messages/batches/{batch.id}/results"
    assert [row.custom_id for row in rows] != [r["custom_id"] for r in requests]  # any order
    assert sorted(by_id) == sorted(r["custom_id"] for r in requests)
    assert all(isinstance(result, MessageBatchSucceededResult) for result in by_id.values())
    assert [row.model_dump() for row in await raw_rows(batch)] == [row.model_dump() for row in rows]
    messages = {
        cid: r.message for cid, r in by_id.items() if isinstance(r, MessageBatchSucceededResult)
    }
    assert json.loads(text_of(messages["as-json"])) == {"answer": "*", "ok": True}
    assert messages["refused"].stop_reason == "refusal"
    assert messages["refused"].stop_details is not None
    assert messages["refused"].stop_details.model_dump() == REFUSAL_DETAILS
    assert text_of(messages["refused"]) == PARTIAL_REFUSAL_TEXT
    assert messages["cut_short"].stop_reason == "max_tokens"
    assert messages["sonnet-1"].model == SONNET
    assert {m.usage.service_tier for m in messages.values()} == {"batch"}
    # Nothing went the real-time way; the batch is on its own record.
    assert real_time_calls(server) == []
    assert server.batch_requests == {HAIKU: 4, SONNET: 1}
    [recorded] = server.batches
    assert recorded.id == batch.id
    assert recorded.custom_ids == tuple(r["custom_id"] for r in requests)
    assert recorded.models == (HAIKU, HAIKU, HAIKU, HAIKU, SONNET)
    assert recorded.processing_status == "ended"
    assert recorded.headers["authorization"] == "Bearer test"  # the SDK's way with an API key

    # The real-time route gives the same answer for the same params.
    for item in requests:
        live = await client.messages.create(**item["params"])
        batched = messages[item["custom_id"]]
        assert (live.content, live.stop_reason, live.model) == (
            batched.content,
            batched.stop_reason,
            batched.model,
        )
        assert (live.usage.input_tokens, live.usage.output_tokens) == (
            batched.usage.input_tokens,
            batched.usage.output_tokens,
        )
    assert len(real_time_calls(server)) == len(requests)


def text_of(message: Message) -> str:
    [block] = message.content
    assert block.type == "text"
    return block.text


async def test_results_are_computed_once(client: anthropic.AsyncAnthropic) -> None:
    created = await client.messages.batches.create(
        requests=[request(f"r{i}", f"question {i}") for i in range(4)]
    )
    await ended(client, created.id)

    first = await results(client, created.id)
    second = await results(client, created.id)

    assert [row.model_dump() for row in first] == [row.model_dump() for row in second]
    ids = {row.result.message.id for row in first if row.result.type == "succeeded"}
    assert len(ids) == 4


async def test_what_the_real_time_route_refuses_is_an_errored_row(
    server: StubServer, client: anthropic.AsyncAnthropic
) -> None:
    server.set_behaviour("sonnet", "http_500")
    created = await client.messages.batches.create(
        requests=[
            request("fine", "hello"),
            request("sonnet-down", "hello", model=SONNET),
            request("overloaded", "stub-fail:haiku=529x1 hello"),
        ]
    )
    batch = await ended(client, created.id)
    by_id = {row.custom_id: row.result for row in await raw_rows(batch)}

    assert (batch.request_counts.succeeded, batch.request_counts.errored) == (1, 2)
    assert by_id["fine"].type == "succeeded"
    errors = {}
    for custom_id in ("sonnet-down", "overloaded"):
        result = by_id[custom_id]
        assert isinstance(result, MessageBatchErroredResult)
        assert result.error.type == "error"
        errors[custom_id] = result.error.error.type
    assert errors == {"sonnet-down": "api_error", "overloaded": "overloaded_error"}
    assert real_time_calls(server) == []


@pytest.mark.parametrize(
    ("requests", "complaint"),
    [
        ([request("has space", "x")], "requests.0.custom_id: String should match pattern"),
        ([request("x" * 65, "x")], "requests.0.custom_id: String should have at most 64"),
        ([request("", "x")], "requests.0.custom_id: String should have at least 1"),
        ([request("a", "x"), request("a", "y")], "requests.1.custom_id: custom_id 'a' is not"),
        ([], "requests: List should have at least 1 item"),
        ([cast(Request, {"custom_id": "a"})], "requests.0.params: Field required"),
        ([request("a", "x", max_tokens=0)], "requests.0.params.max_tokens: Input should be"),
        ([request("a", "x", stream=True)], "requests.0.params.stream"),
    ],
)
async def test_a_malformed_batch_is_refused_at_creation(
    server: StubServer,
    client: anthropic.AsyncAnthropic,
    requests: list[Request],
    complaint: str,
) -> None:
    with pytest.raises(anthropic.BadRequestError) as raised:
        await client.messages.batches.create(requests=requests)

    assert raised.value.status_code == 400
    body = raised.value.body
    assert isinstance(body, dict)
    assert body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith(complaint)
    assert server.batches == []
    assert server.batch_requests == {}


def test_missing_params_fields_are_refused_at_creation(server: StubServer) -> None:
    """Through plain HTTP: the SDK's types would not let these out."""
    url = f"{server.url}/v1/messages/batches"
    bare = {"custom_id": "a", "params": {"model": HAIKU, "max_tokens": 8}}
    missing = httpx.post(url, json={"requests": [bare]}, headers=HEADERS)
    too_many = httpx.post(
        url,
        json={"requests": [{}] * 100_001},  # counted before anything else is looked at
        headers=HEADERS,
    )

    assert missing.status_code == 400
    assert missing.json()["error"]["message"] == "requests.0.params.messages: Field required"
    assert too_many.status_code == 400
    assert too_many.json()["error"]["message"] == (
        "requests: List should have at most 100000 items after validation, not 100001"
    )


def test_auth_and_version_are_checked_as_for_messages(server: StubServer) -> None:
    url = f"{server.url}/v1/messages/batches"
    body = {"requests": [request("a", "x")]}
    no_key = httpx.post(url, json=body, headers={"anthropic-version": "2023-06-01"})
    no_version = httpx.get(url, headers={"x-api-key": "test"})

    assert no_key.status_code == 401
    assert no_key.json()["error"] == {
        "type": "authentication_error",
        "message": "invalid x-api-key",
    }
    assert no_version.status_code == 400
    assert no_version.json()["error"]["type"] == "invalid_request_error"
    assert server.batches == []
    assert [call.path for call in server.batch_calls] == ["/v1/messages/batches"] * 2


async def test_a_body_over_the_limit_is_413(
    server: StubServer, client: anthropic.AsyncAnthropic
) -> None:
    server.batch_max_bytes = 10_000  # the service's is 256 MB

    with pytest.raises(anthropic.APIStatusError) as raised:
        await client.messages.batches.create(requests=[request("big", "x" * 20_000)])

    assert raised.value.status_code == 413
    assert isinstance(raised.value.body, dict)
    assert raised.value.body["error"]["type"] == "request_too_large"
    assert server.batches == []


async def test_cancel_ends_the_batch_with_canceled_rows(client: anthropic.AsyncAnthropic) -> None:
    created = await client.messages.batches.create(
        requests=[request(f"r{i}", "stub:*=hang") for i in range(3)]
    )

    canceling = await client.messages.batches.cancel(created.id)
    batch = await ended(client, created.id)
    rows = await results(client, created.id)

    assert canceling.processing_status == "canceling"
    assert canceling.cancel_initiated_at is not None
    assert canceling.request_counts.processing == 3
    assert batch.request_counts.canceled == 3
    assert batch.cancel_initiated_at == canceling.cancel_initiated_at
    assert all(isinstance(row.result, MessageBatchCanceledResult) for row in rows)
    assert len(rows) == 3


async def test_cancel_keeps_what_was_processed(
    server: StubServer, client: anthropic.AsyncAnthropic
) -> None:
    created = await client.messages.batches.create(
        requests=[request("quick", "hello"), request("stuck", "stub:*=hang")]
    )
    await asyncio.sleep(server.batch_seconds + 0.2)

    still = await client.messages.batches.retrieve(created.id)  # a hanging row holds it open
    await client.messages.batches.cancel(created.id)
    batch = await ended(client, created.id)
    by_id = {row.custom_id: row.result.type for row in await raw_rows(batch)}

    assert still.processing_status == "in_progress"
    assert by_id == {"quick": "succeeded", "stuck": "canceled"}
    assert (batch.request_counts.succeeded, batch.request_counts.canceled) == (1, 1)
    with pytest.raises(anthropic.BadRequestError):
        await client.messages.batches.cancel(created.id)  # ended: nothing left to cancel


async def test_an_expired_batch_has_expired_rows(
    server: StubServer, client: anthropic.AsyncAnthropic
) -> None:
    server.expire_batches = True
    created = await client.messages.batches.create(
        requests=[request("a", "hello"), request("b", "hi", model=SONNET)]
    )
    server.expire_batches = False  # only batches created while it is set expire
    other = await client.messages.batches.create(requests=[request("c", "hello")])

    batch = await ended(client, created.id)
    rows = await results(client, created.id)
    other_rows = await results(client, (await ended(client, other.id)).id)

    assert batch.request_counts.expired == 2
    assert batch.request_counts.succeeded == 0
    assert all(isinstance(row.result, MessageBatchExpiredResult) for row in rows)
    assert [row.result.type for row in other_rows] == ["succeeded"]


async def test_unknown_batches_are_404(
    server: StubServer, client: anthropic.AsyncAnthropic
) -> None:
    missing = "msgbatch_01NoSuchBatchXXXXXXXXXXXX"

    with pytest.raises(anthropic.NotFoundError) as raised:
        await client.messages.batches.retrieve(missing)
    with pytest.raises(anthropic.NotFoundError):
        await client.messages.batches.cancel(missing)
    with pytest.raises(anthropic.NotFoundError):
        await client.messages.batches.delete(missing)
    raw = await get(f"{server.url}/v1/messages/batches/{missing}/results")

    assert isinstance(raised.value.body, dict)
    assert raised.value.body["error"]["type"] == "not_found_error"
    assert raw.status_code == 404


async def test_results_before_the_end(server: StubServer, client: anthropic.AsyncAnthropic) -> None:
    server.batch_seconds = 30
    created = await client.messages.batches.create(requests=[request("a", "x")])

    with pytest.raises(anthropic.AnthropicError, match="No `results_url`"):
        await client.messages.batches.results(created.id)  # the SDK looks before it fetches
    raw = await get(f"{server.url}/v1/messages/batches/{created.id}/results")

    assert raw.status_code == 400
    assert raw.json()["error"]["type"] == "invalid_request_error"


async def test_the_results_file_is_jsonl(
    server: StubServer, client: anthropic.AsyncAnthropic
) -> None:
    created = await client.messages.batches.create(requests=[request("a", "x"), request("b", "y")])
    batch = await ended(client, created.id)
    assert batch.results_url is not None
    as_sdk = await get(batch.results_url, accept="application/binary")
    plain = await get(batch.results_url)

    assert as_sdk.headers["content-type"] == "application/binary"
    assert plain.headers["content-type"] == "application/x-jsonl"
    assert as_sdk.content == plain.content
    assert plain.text.endswith("\n")
    assert len(plain.text.splitlines()) == 2


async def test_list_pages_and_delete(server: StubServer, client: anthropic.AsyncAnthropic) -> None:
    server.batch_seconds = 30  # in progress until canceled
    ids = []
    for i in range(3):
        made = await client.messages.batches.create(requests=[request(f"r{i}", "x")])
        ids.append(made.id)
    newest_first = ids[::-1]

    first = await client.messages.batches.list(limit=2)
    every = [batch.id async for batch in client.messages.batches.list(limit=2)]
    before = await client.messages.batches.list(limit=2, before_id=ids[0])
    with pytest.raises(anthropic.BadRequestError):
        await client.messages.batches.delete(ids[1])  # still processing
    await client.messages.batches.cancel(ids[1])
    await ended(client, ids[1])
    deleted = await client.messages.batches.delete(ids[1])
    after_delete = [batch.id async for batch in client.messages.batches.list()]

    assert [b.id for b in first.data] == newest_first[:2]
    assert (first.has_more, first.first_id, first.last_id) == (True, ids[2], ids[1])
    assert every == newest_first
    assert [b.id for b in before.data] == newest_first[:2]
    assert before.has_more is False
    assert (deleted.id, deleted.type) == (ids[1], "message_batch_deleted")
    assert after_delete == [ids[2], ids[0]]
    with pytest.raises(anthropic.NotFoundError):
        await client.messages.batches.retrieve(ids[1])
    assert [b.deleted for b in server.batches] == [False, True, False]
