"""Message Batches (llm_router.worker.batches) against fakeredis, Lua included.

The request and the answer as pure functions (``request_params``, ``reply_of``, the
batch price); a parked job's state (``ParkOrder``, ``parse_parked``); the scripts through
:meth:`RedisQueue.park <llm_router.worker.queue.RedisQueue.park>` and the scripts
:class:`MessageBatches` registers; and ``send_due``, ``poll`` and ``counts`` with a fake
Anthropic client in place of the real one (no network).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import anthropic
import httpx2
import litellm
import pytest
from anthropic.types.messages import MessageBatch, MessageBatchIndividualResponse
from pydantic import SecretStr
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from llm_router.client.keys import (
    MSGBATCH_SWEEP_LEASE,
    PARKED_DEADLINES_KEY,
    PARKED_KEY,
    PARKED_SCORE_MS,
    MsgBatchKeys,
    cancel_key,
    in_progress_key,
    job_key,
    parked_key,
    retry_key,
    wake_key,
)
from llm_router.client.protocol import Attempt
from llm_router.worker.batch_wire import JSON_TOOL, reply_of, request_params
from llm_router.worker.batches import SENDING_STALE_MS, MessageBatches
from llm_router.worker.budgets import Hold
from llm_router.worker.calls import ModelCallError
from llm_router.worker.costs import (
    FRAMING_TOKENS,
    batch_usage,
    worst_case_batch_usd,
    worst_case_usd,
)
from llm_router.worker.lanes import Lane, Lanes
from llm_router.worker.parked import PARK_KEEP_MS, ParkedJob, ParkOrder, parse_parked
from llm_router.worker.queue import Claimed, Parking, RedisQueue
from llm_router.worker.settings import ModelConfig, Settings

HAIKU = "anthropic/claude-haiku-4-5-20251001"
Q = "q-batches"
BQ = Q + ":batch"
KEYS = MsgBatchKeys(BQ)


def haiku(**kw: Any) -> ModelConfig:
    return ModelConfig(
        model=HAIKU, timeout=30.0, batch_api=True, api_key=SecretStr("sk-test"), **kw
    )


def settings(**kw: Any) -> Settings:
    return Settings(
        chains={"default": [haiku()]}, **{"queue_name": Q, "batch_queue_name": BQ, **kw}
    )


def hold() -> Hold:
    return Hold(day="2025-06-01", chain="default", nusd=1234, member="m-1")


def parked_with(result: Any) -> ParkedJob:
    return ParkedJob(
        model=HAIKU,
        position=1,
        attempts=[],
        hold=hold(),
        started_ms=1,
        parked_ms=2,
        custom_id="c",
        result=result,
    )


def now_ms() -> int:
    return int(time.time() * 1000)


# --- request_params --------------------------------------------------------------------------


def test_request_params_turns_system_and_content_parts() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": [{"type": "text", "text": "Be kind.", "extra": 1}]},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "https://example.test/a.png"}},
                {"type": "image_url", "image_url": "https://example.test/b.png"},
            ],
        },
    ]
    params = request_params(haiku(), messages, None, 4096)
    assert params["model"] == "claude-haiku-4-5-20251001"  # the provider's name
    assert params["max_tokens"] == 4096
    assert params["system"] == [
        {"type": "text", "text": "Be brief."},
        {"type": "text", "text": "Be kind."},  # unknown keys of a part are dropped
    ]
    assert params["messages"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image", "source": {"type": "url", "url": "https://example.test/a.png"}},
                {"type": "image", "source": {"type": "url", "url": "https://example.test/b.png"}},
            ],
        },
    ]
    assert "tools" not in params
    assert "tool_choice" not in params
    assert not any("cache_control" in block for block in params["system"])


def test_an_inline_image_is_sent_as_base64_as_litellm_does() -> None:
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    params = request_params(haiku(), [{"role": "user", "content": [part]}], None, 10)
    assert params["messages"][0]["content"] == [
        {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
        }
    ]


def test_request_params_without_system_sends_none() -> None:
    params = request_params(haiku(), [{"role": "user", "content": "Hi"}], None, 10)
    assert "system" not in params
    assert params["messages"] == [{"role": "user", "content": "Hi"}]


def test_an_object_schema_becomes_the_forced_json_tool() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    params = request_params(haiku(), [{"role": "user", "content": "n?"}], schema, 100)
    assert params["tools"] == [{"name": JSON_TOOL, "input_schema": schema}]
    assert params["tool_choice"] == {"type": "tool", "name": "json_tool_call"}


@pytest.mark.parametrize(
    "schema", [{"type": "array", "items": {"type": "integer"}}, {"type": "string"}, {}]
)
def test_a_schema_that_is_not_an_object_sends_no_tool(schema: dict[str, Any]) -> None:
    params = request_params(haiku(), [{"role": "user", "content": "n?"}], schema, 100)
    assert "tools" not in params
    assert "tool_choice" not in params


def test_structured_output_off_sends_no_tool() -> None:
    schema = {"type": "object", "properties": {}}
    cfg = haiku(structured_output=False)
    params = request_params(cfg, [{"role": "user", "content": "n?"}], schema, 100)
    assert "tools" not in params


def test_the_models_params_override_but_not_model_or_messages() -> None:
    cfg = haiku(params={"temperature": 0, "max_tokens": 123, "model": "x", "messages": []})
    params = request_params(cfg, [{"role": "user", "content": "Hi"}], None, 4096)
    assert params["temperature"] == 0
    assert params["max_tokens"] == 123
    assert params["model"] == "claude-haiku-4-5-20251001"
    assert params["messages"] == [{"role": "user", "content": "Hi"}]


def test_cache_prompt_marks_the_last_system_block() -> None:
    messages = [
        {"role": "system", "content": "first"},
        {"role": "user", "content": "Hi"},
        {"role": "system", "content": "second"},
    ]
    params = request_params(haiku(cache_prompt=True), messages, None, 10)
    assert params["system"] == [
        {"type": "text", "text": "first"},
        {"type": "text", "text": "second", "cache_control": {"type": "ephemeral"}},
    ]
    assert params["messages"] == [{"role": "user", "content": "Hi"}]


def test_cache_prompt_on_a_system_message_of_parts() -> None:
    messages: list[dict[str, Any]] = [
        {
            "role": "system",
            "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
        },
        {"role": "user", "content": "Hi"},
    ]
    params = request_params(haiku(cache_prompt=True), messages, None, 10)
    assert params["system"] == [
        {"type": "text", "text": "a"},
        {"type": "text", "text": "b", "cache_control": {"type": "ephemeral"}},
    ]


# --- reply_of and the batch price ----------------------------------------------------------


def succeeded(content: list[Any], stop: str = "end_turn", **message: Any) -> dict[str, Any]:
    return {
        "type": "succeeded",
        "message": {"content": content, "stop_reason": stop, "usage": {}, **message},
    }


def test_text_blocks_are_the_answer() -> None:
    result = succeeded(
        [{"type": "text", "text": "  Hello "}, {"type": "text", "text": "world  "}, "junk"]
    )
    reply = reply_of(haiku(), parked_with(result), 4096)
    assert reply.text == "Hello world"
    assert reply.finish.reason == "stop"
    assert reply.finish.provider_reason == "end_turn"
    assert reply.finish.word == "stop"
    assert not reply.finish.truncated
    assert not reply.finish.refused
    assert reply.finish.limit is None


def test_the_json_tool_block_is_the_json_answer() -> None:
    answer = {"n": 3, "name": "é"}
    result = succeeded(
        [
            {"type": "tool_use", "id": "t1", "name": JSON_TOOL, "input": answer},
            {"type": "tool_use", "id": "t2", "name": "other_tool", "input": {"x": 1}},
        ],
        stop="tool_use",
    )
    reply = reply_of(haiku(), parked_with(result), 4096)
    assert json.loads(reply.text) == answer
    assert "é" in reply.text  # not escaped


@pytest.mark.parametrize(
    ("limit", "said"), [(512, "max_tokens (512)"), (4096, "max_tokens (4,096)")]
)
def test_max_tokens_is_truncated_at_the_limit(limit: int, said: str) -> None:
    result = succeeded([{"type": "text", "text": "half an ans"}], stop="max_tokens")
    reply = reply_of(haiku(), parked_with(result), limit)
    assert reply.finish.truncated
    assert reply.finish.word == "length"
    assert reply.finish.provider_reason == "max_tokens"
    assert reply.finish.limit == said


def test_a_refusal_says_its_category_and_explanation() -> None:
    result = succeeded(
        [],
        stop="refusal",
        stop_details={"type": "refusal", "category": "cyber", "explanation": "Not this."},
    )
    reply = reply_of(haiku(), parked_with(result), 4096)
    assert reply.finish.refused
    assert not reply.finish.truncated
    assert reply.finish.word == "content_filter"
    assert reply.finish.refusal_category == "cyber"
    assert reply.finish.refusal_explanation == "Not this."
    assert reply.text == ""


def test_stop_details_count_only_for_a_refusal() -> None:
    result = succeeded(
        [{"type": "text", "text": "ok"}], stop_details={"category": "cyber", "explanation": "x"}
    )
    reply = reply_of(haiku(), parked_with(result), 4096)
    assert reply.finish.refusal_category is None
    assert reply.finish.refusal_explanation is None


def realtime_prices() -> dict[str, float]:
    info = litellm.get_model_info(HAIKU)
    return {
        "input_tokens": float(info["input_cost_per_token"] or 0),
        "output_tokens": float(info["output_cost_per_token"] or 0),
        "cache_read_input_tokens": float(info["cache_read_input_token_cost"] or 0),
        "cache_creation_input_tokens": float(info["cache_creation_input_token_cost"] or 0),
    }


@pytest.mark.parametrize(
    "field",
    ["input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"],
)
def test_each_kind_of_token_costs_half_in_a_batch(field: str) -> None:
    price = realtime_prices()[field]
    assert price > 0  # litellm knows Haiku's price of every kind
    usage = batch_usage(HAIKU, {field: 1_000_000})
    assert getattr(usage, field) == 1_000_000
    assert usage.cost_usd == pytest.approx(price * 1_000_000 / 2, rel=1e-12)


def test_a_replys_usage_is_priced_at_half_the_realtime_price() -> None:
    tokens = {
        "input_tokens": 1200,
        "output_tokens": 345,
        "cache_read_input_tokens": 5000,
        "cache_creation_input_tokens": 700,
    }
    usage_field = {
        **tokens,
        "cache_creation": {"ephemeral_5m_input_tokens": 700},  # not a count: ignored
        "service_tier": "batch",
        "server_tool_use": None,
    }
    result = succeeded([{"type": "text", "text": "ok"}], usage=usage_field)
    reply = reply_of(haiku(), parked_with(result), 4096)
    assert reply.usage is not None
    prices = realtime_prices()
    realtime = sum(prices[name] * count for name, count in tokens.items())
    assert reply.usage.cost_usd == pytest.approx(realtime / 2, rel=1e-9)
    assert reply.usage.input_tokens == 1200
    assert reply.usage.output_tokens == 345
    assert reply.usage.cache_read_input_tokens == 5000
    assert reply.usage.cache_creation_input_tokens == 700


def test_the_worst_case_batch_price_is_half_the_realtime_one() -> None:
    realtime = worst_case_usd(HAIKU, 10_000, 4096)
    assert realtime > 0
    assert worst_case_batch_usd(HAIKU, 10_000, 4096) == pytest.approx(realtime / 2, rel=1e-12)


def test_without_batch_prices_of_its_own_a_batch_costs_half(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A price map with no ``*_batches`` prices: half of each real-time price."""
    info = {
        "input_cost_per_token": 4e-6,
        "output_cost_per_token": 2e-5,
        "cache_read_input_token_cost": 4e-7,
        "cache_creation_input_token_cost": 5e-6,
        "output_cost_per_token_batches": 1e-6,  # its own: wins
    }
    monkeypatch.setattr(litellm, "get_model_info", lambda model: info)
    tokens = {"input_tokens": 1000, "output_tokens": 100, "cache_read_input_tokens": 10_000,
              "cache_creation_input_tokens": 2000}  # fmt: skip
    usage = batch_usage("anthropic/some-model", tokens)
    assert usage.cost_usd == pytest.approx(
        (1000 * 4e-6 + 10_000 * 4e-7 + 2000 * 5e-6) / 2 + 100 * 1e-6, rel=1e-9
    )
    worst = worst_case_batch_usd("anthropic/some-model", 1000, 100)
    assert worst == pytest.approx((1000 + FRAMING_TOKENS) * 5e-6 / 2 + 100 * 1e-6, rel=1e-9)


def test_an_unknown_model_costs_nothing_in_a_batch() -> None:
    assert batch_usage("anthropic/no-such-model", {"input_tokens": 10}).cost_usd == 0.0
    assert worst_case_batch_usd("anthropic/no-such-model", 100, 100) == 0.0


def raised(result: Any) -> str:
    with pytest.raises(ModelCallError) as info:
        reply_of(haiku(), parked_with(result), 4096)
    return info.value.reason


def test_an_errored_request_raises_with_its_error() -> None:
    result = {
        "type": "errored",
        "error": {
            "type": "error",
            "error": {"type": "invalid_request_error", "message": "max_tokens: too big"},
        },
    }
    assert raised(result) == "BatchErrored: invalid_request_error: max_tokens: too big"


def test_an_errored_requests_message_is_cut_and_a_missing_error_is_named() -> None:
    long = {"type": "errored", "error": {"type": "api_error", "message": "x" * 500}}
    reason = raised(long)
    assert reason.startswith("BatchErrored: api_error: xxx")
    assert len(reason) == len("BatchErrored: api_error: ") + 200
    assert raised({"type": "errored", "error": "boom"}) == "BatchErrored: error: "


def test_expired_and_canceled_requests_raise() -> None:
    assert raised({"type": "expired"}).startswith("BatchExpired")
    assert raised({"type": "canceled"}).startswith("BatchCanceled")


@pytest.mark.parametrize(
    "result",
    [None, {}, {"type": "weird"}, {"type": "succeeded"}, {"type": "succeeded", "message": "x"}],
)
def test_a_garbage_result_is_malformed(result: Any) -> None:
    assert raised(result).startswith("MalformedResponse")


# --- the parked state ----------------------------------------------------------------------


def order(custom_id: str = "c-1", model: str = HAIKU) -> ParkOrder:
    return ParkOrder(
        model=model,
        position=1,
        attempts=[
            Attempt(
                model="ollama_chat/qwen2.5:7b",
                outcome="rejected",
                reason="Invalid: not JSON",
                latency_ms=812,
                cost_usd=0.0,
            )
        ],
        params={
            "model": "claude-haiku-4-5-20251001",
            "max_tokens": 10,
            "messages": [{"role": "user", "content": "café"}],
        },
        hold=hold(),
        started_ms=1_700_000_000_000,
        custom_id=custom_id,
    )


def test_state_round_trips_through_parse_parked() -> None:
    o = order()
    fields = {b"state": o.state().encode(), b"custom_id": b"c-1", b"parked_ms": b"99",
              b"queue": BQ.encode(), b"score": b"5"}  # fmt: skip
    parked = parse_parked(fields)
    assert parked == ParkedJob(
        model=HAIKU,
        position=1,
        attempts=o.attempts,
        hold=hold(),
        started_ms=1_700_000_000_000,
        parked_ms=99,
        custom_id="c-1",
    )
    result = {"type": "expired"}
    with_result = {**fields, b"result": json.dumps(result).encode(), b"batch_id": b"msgbatch_1"}
    parked = parse_parked(with_result)
    assert parked is not None
    assert parked.result == result
    assert parked.batch_id == "msgbatch_1"


def test_entry_holds_the_request() -> None:
    o = order()
    entry = o.entry("job-1")
    assert json.loads(entry) == {
        "ms": o.parked_ms,
        "custom_id": "c-1",
        "job_id": "job-1",
        "params": order().params,
    }
    assert entry.startswith('{"ms":')  # where msgbatch_take.lua reads it
    assert abs(o.parked_ms - now_ms()) < 60_000
    assert "café" in entry  # not escaped: a batch is bounded in bytes


def test_custom_ids_are_new_for_each_order() -> None:
    a = ParkOrder(HAIKU, 0, [], {}, hold(), 0)
    b = ParkOrder(HAIKU, 0, [], {}, hold(), 0)
    assert a.custom_id != b.custom_id
    assert len(a.custom_id) <= 64  # the API's bound on custom_id


@pytest.mark.parametrize("missing", [b"state", b"custom_id", b"parked_ms"])
def test_parse_parked_of_a_hash_missing_a_field_is_none(missing: bytes) -> None:
    fields = {b"state": order().state().encode(), b"custom_id": b"c-1", b"parked_ms": b"1"}
    del fields[missing]
    assert parse_parked(fields) is None


@pytest.mark.parametrize(
    "state",
    [
        b"not json",
        b"{}",
        b'{"model":"m","position":1,"attempts":[],"hold":{"x":1},"started_ms":1}',
    ],
)
def test_parse_parked_of_an_unreadable_state_is_none(state: bytes) -> None:
    assert parse_parked({b"state": state, b"custom_id": b"c", b"parked_ms": b"1"}) is None


def test_a_result_that_is_not_an_object_reads_as_none() -> None:
    fields = {b"state": order().state().encode(), b"custom_id": b"c-1", b"parked_ms": b"1",
              b"result": b"[1]"}  # fmt: skip
    parked = parse_parked(fields)
    assert parked is not None
    assert parked.result is None


# --- the scripts, against fakeredis --------------------------------------------------------


def the_lanes() -> Lanes:
    return Lanes(Q, BQ, max_jobs=4, batch_max_jobs=2, keep_result_s=60, batch_keep_result_s=600)


def batch_lane() -> Lane:
    return the_lanes().queues[1]


async def claimed(redis: Redis, job_id: str, score: int, token: str = "me") -> Claimed:
    """A batch-lane job as claim.lua leaves it: queued, leased, its try counted."""
    await redis.set(job_key(job_id), b'{"t":1}')
    await redis.zadd(BQ, {job_id: score})
    await redis.set(in_progress_key(job_id), token)
    await redis.incr(retry_key(job_id))
    return Claimed(job_id=job_id, lane=batch_lane(), score=score, blob=b"{}", tries=1)


def parking(o: ParkOrder, job_id: str) -> Parking:
    return Parking(o.model, o.custom_id, o.state(), o.entry(job_id), PARK_KEEP_MS)


async def park(redis: Redis, job_id: str, score: int, custom_id: str, model: str = HAIKU) -> str:
    """Claim and park a job; its entry."""
    queue = RedisQueue(redis, the_lanes(), token="me", lease_ms=10_000)
    o = order(custom_id, model)
    assert await queue.park(await claimed(redis, job_id, score), parking(o, job_id))
    return o.entry(job_id)


async def snapshot(redis: Redis) -> dict[bytes, Any]:
    out: dict[bytes, Any] = {}
    for key in sorted(await redis.keys("*")):
        kind = (await redis.type(key)).decode()
        if kind == "string":
            value: Any = await redis.get(key)
        elif kind == "zset":
            value = await redis.zrange(key, 0, -1, withscores=True)
        elif kind == "list":
            value = await redis.lrange(key, 0, -1)  # type: ignore[misc]
        elif kind == "hash":
            value = await redis.hgetall(key)  # type: ignore[misc]
        else:
            value = kind
        out[key] = (kind, value, await redis.pttl(key) > 0)
    return out


async def test_park_keeps_the_state_queues_the_request_and_releases_the_job(
    redis: Redis,
) -> None:
    await redis.set(retry_key("j1"), 2)  # a second try: the park does not count it
    before = now_ms()
    entry = await park(redis, "j1", 1234, "c-1")
    after = now_ms()
    assert await redis.exists(in_progress_key("j1")) == 0
    score = await redis.zscore(BQ, "j1")
    assert score is not None
    assert score > after + PARKED_SCORE_MS
    assert await redis.get(retry_key("j1")) == b"2"  # 2 + 1 (the claim) - 1 (the park)
    assert await redis.lrange(KEYS.pending(HAIKU), 0, -1) == [entry.encode()]  # type: ignore[misc]
    model_score = await redis.zscore(KEYS.models, HAIKU)
    assert model_score is not None
    assert before <= model_score <= after
    assert await redis.zscore(PARKED_KEY, "j1") is not None
    fields = await redis.hgetall(parked_key("j1"))  # type: ignore[misc]
    assert fields[b"queue"] == BQ.encode()
    assert fields[b"score"] == b"1234"
    assert fields[b"custom_id"] == b"c-1"
    assert fields[b"state"] == order("c-1").state().encode()
    assert b"result" not in fields
    assert 0 < await redis.pttl(parked_key("j1")) <= PARK_KEEP_MS
    assert 0 < await redis.pttl(job_key("j1")) <= PARK_KEEP_MS
    parked = await MessageBatches(redis, settings()).parked("j1")
    assert parked is not None
    assert parked.custom_id == "c-1"
    assert parked.position == 1
    assert parked.hold == hold()
    assert before <= parked.parked_ms <= after


async def test_park_without_the_lease_changes_nothing(redis: Redis) -> None:
    queue = RedisQueue(redis, the_lanes(), token="me", lease_ms=10_000)
    job = await claimed(redis, "j1", 1234, token="other")
    before = await snapshot(redis)
    assert not await queue.park(job, parking(order(), "j1"))
    assert await snapshot(redis) == before
    assert await redis.get(in_progress_key("j1")) == b"other"


async def test_parking_again_without_state_keeps_the_state_and_sends_nothing(
    redis: Redis,
) -> None:
    await park(redis, "j1", 1234, "c-1")
    state = await redis.hgetall(parked_key("j1"))  # type: ignore[misc]
    pending = await redis.lrange(KEYS.pending(HAIKU), 0, -1)  # type: ignore[misc]
    # Claimed again (as if put back before its result counted): parked again, no state.
    queue = RedisQueue(redis, the_lanes(), token="me", lease_ms=10_000)
    job = await claimed(redis, "j1", 1234)
    again = Parking(HAIKU, "c-1", None, None, PARK_KEEP_MS)
    assert await queue.park(job, again)
    assert await redis.hgetall(parked_key("j1")) == state  # type: ignore[misc]
    assert await redis.lrange(KEYS.pending(HAIKU), 0, -1) == pending  # type: ignore[misc]
    score = await redis.zscore(BQ, "j1")
    assert score is not None
    assert score > now_ms() + PARKED_SCORE_MS
    assert await redis.exists(in_progress_key("j1")) == 0
    assert await redis.get(retry_key("j1")) == b"0"


async def test_finishing_a_job_drops_its_parked_state(redis: Redis) -> None:
    await park(redis, "j1", 1234, "c-1")
    queue = RedisQueue(redis, the_lanes(), token="me", lease_ms=10_000)
    job = await claimed(redis, "j1", 1234)
    assert await queue.finish(job, b'{"status":"ok"}', None, announce=False)
    assert await redis.exists(parked_key("j1")) == 0
    assert await redis.get("arq:result:j1") == b'{"status":"ok"}'


def entries(n: int, size: int = 10) -> list[str]:
    return [f"e{i}".ljust(size, ".") for i in range(n)]


async def take(
    mb: MessageBatches, most: int, room: int, take_id: str = "t1|" + HAIKU, at: int = 500
) -> list[bytes]:
    keys = [KEYS.pending(HAIKU), KEYS.models,
            KEYS.take(take_id), KEYS.sending]  # fmt: skip
    taken: list[bytes] = await mb._take(keys=keys, args=[HAIKU, most, room, take_id, at])
    return taken


async def waiting(redis: Redis, model: str = HAIKU) -> list[bytes]:
    found: list[bytes] = await redis.lrange(KEYS.pending(model), 0, -1)  # type: ignore[misc]
    return found


async def fill(redis: Redis, items: list[str], model: str = HAIKU, oldest: int = 100) -> None:
    await redis.rpush(KEYS.pending(model), *items)  # type: ignore[misc]
    await redis.zadd(KEYS.models, {model: oldest})


async def test_take_takes_at_most_n_and_the_rest_stay(redis: Redis) -> None:
    mb = MessageBatches(redis, settings())
    items = entries(5)
    await fill(redis, items)
    assert await take(mb, 3, 10_000) == [e.encode() for e in items[:3]]
    assert await waiting(redis) == [e.encode() for e in items[3:]]
    assert await redis.zscore(KEYS.models, HAIKU) == 500  # still waiting, rescored
    sending = await redis.lrange(KEYS.take("t1|" + HAIKU), 0, -1)  # type: ignore[misc]
    assert sending == [e.encode() for e in items[:3]]
    assert await redis.zrange(KEYS.sending, 0, -1, withscores=True) == [
        (("t1|" + HAIKU).encode(), 500.0)
    ]


async def test_take_stays_within_the_byte_bound_but_takes_one(redis: Redis) -> None:
    mb = MessageBatches(redis, settings())
    items = entries(4, size=10)
    await fill(redis, items)
    assert len(await take(mb, 100, 25, "t1|" + HAIKU)) == 2  # 20 bytes; a third makes 30
    assert await take(mb, 100, 5, "t2|" + HAIKU) == [items[2].encode()]  # too big, but one
    assert await waiting(redis) == [items[3].encode()]


async def test_take_of_the_last_requests_forgets_the_model(redis: Redis) -> None:
    mb = MessageBatches(redis, settings())
    await fill(redis, entries(2))
    await redis.zadd(KEYS.models, {"other": 1})
    assert len(await take(mb, 10, 10_000)) == 2
    assert await redis.exists(KEYS.pending(HAIKU)) == 0
    assert await redis.zrange(KEYS.models, 0, -1) == [b"other"]


async def test_take_of_nothing_lists_no_take(redis: Redis) -> None:
    mb = MessageBatches(redis, settings())
    await redis.zadd(KEYS.models, {HAIKU: 1})
    assert await take(mb, 10, 10_000) == []
    assert await redis.zcard(KEYS.sending) == 0
    assert await redis.zcard(KEYS.models) == 0


async def test_take_of_more_than_a_thousand(redis: Redis) -> None:
    """The script pushes in slices of 1000 (Lua's unpack is bounded)."""
    mb = MessageBatches(redis, settings())
    items = entries(2500, size=6)
    await fill(redis, items)
    assert len(await take(mb, 2400, 10**9)) == 2400
    sent = await redis.lrange(KEYS.take("t1|" + HAIKU), 0, -1)  # type: ignore[misc]
    assert sent == [e.encode() for e in items[:2400]]
    assert len(await waiting(redis)) == 100


async def test_return_puts_a_take_back_at_the_head_in_order(redis: Redis) -> None:
    mb = MessageBatches(redis, settings())
    items = entries(5)
    await fill(redis, items)
    await take(mb, 3, 10_000)
    await redis.rpush(KEYS.pending(HAIKU), "late")  # type: ignore[misc]
    take_id = "t1|" + HAIKU
    keys = [KEYS.take(take_id), KEYS.sending,
            KEYS.pending(HAIKU), KEYS.models]  # fmt: skip
    assert await mb._return(keys=keys, args=[take_id, HAIKU, 777]) == 3
    assert await waiting(redis) == [e.encode() for e in items] + [b"late"]
    assert await redis.exists(KEYS.take(take_id)) == 0
    assert await redis.zcard(KEYS.sending) == 0
    assert await redis.zscore(KEYS.models, HAIKU) == 777
    # A take returned twice (two senders saw it stale) puts nothing back twice.
    assert await mb._return(keys=keys, args=[take_id, HAIKU, 888]) == 0
    assert len(await waiting(redis)) == 6
    assert await redis.zscore(KEYS.models, HAIKU) == 777


async def test_put_back_stores_the_result_once_and_requeues_the_job(redis: Redis) -> None:
    await park(redis, "j1", 1234, "c-1")
    await redis.rpush(wake_key(BQ), *(["1"] * 100))  # type: ignore[misc]
    mb = MessageBatches(redis, settings())
    first = {"type": "expired"}
    assert await mb._put_back([("j1", "c-1", first)], "msgbatch_1") == 1
    assert await redis.zscore(BQ, "j1") == 1234  # its old place
    assert await redis.llen(wake_key(BQ)) == 100  # type: ignore[misc]  # one more, trimmed
    assert await redis.zscore(PARKED_KEY, "j1") is None
    parked = await mb.parked("j1")
    assert parked is not None
    assert parked.result == first
    assert parked.batch_id == "msgbatch_1"
    # A second result for the same request is dropped, whatever it says.
    await redis.zadd(BQ, {"j1": 99_999})
    assert await mb._put_back([("j1", "c-1", {"type": "canceled"})], "msgbatch_2") == 0
    parked = await mb.parked("j1")
    assert parked is not None
    assert parked.result == first
    assert parked.batch_id == "msgbatch_1"
    assert await redis.zscore(BQ, "j1") == 99_999


async def test_put_back_pushes_a_wake_up(redis: Redis) -> None:
    await park(redis, "j1", 1234, "c-1")
    mb = MessageBatches(redis, settings())
    assert await mb._put_back([("j1", "c-1", {"type": "expired"})], "b") == 1
    assert await redis.lrange(wake_key(BQ), 0, -1) == [b"1"]  # type: ignore[misc]


async def test_put_back_of_another_request_is_dropped(redis: Redis) -> None:
    await park(redis, "j1", 1234, "c-1")
    mb = MessageBatches(redis, settings())
    assert await mb._put_back([("j1", "c-old", {"type": "expired"})], "b") == 0
    parked = await mb.parked("j1")
    assert parked is not None
    assert parked.result is None
    score = await redis.zscore(BQ, "j1")
    assert score is not None
    assert score > now_ms() + PARKED_SCORE_MS
    assert await redis.zscore(PARKED_KEY, "j1") is not None
    assert await redis.exists(wake_key(BQ)) == 0
    # A job no longer parked at all (finished, its state gone) is dropped too.
    assert await mb._put_back([("gone", "c-1", {"type": "expired"})], "b") == 0
    assert await redis.exists(parked_key("gone")) == 0


# --- send_due, poll and counts with a fake Anthropic client --------------------------------


async def rows_of(rows: list[MessageBatchIndividualResponse]) -> AsyncIterator[Any]:
    for row in rows:
        yield row


class FakeBatches:
    """``client.messages.batches`` as far as MessageBatches uses it."""

    def __init__(self) -> None:
        self.created: list[list[dict[str, Any]]] = []
        self.fail: Exception | None = None
        self.status = "ended"
        self.rows: list[MessageBatchIndividualResponse] = []
        self.retrieved: list[str] = []

    async def create(self, *, requests: list[dict[str, Any]]) -> Any:
        if self.fail is not None:
            raise self.fail
        self.created.append(requests)
        return SimpleNamespace(id=f"msgbatch_{len(self.created)}")

    async def retrieve(self, batch_id: str) -> MessageBatch:
        if self.fail is not None:
            raise self.fail
        self.retrieved.append(batch_id)
        counts = {"canceled": 0, "errored": 0, "expired": 0, "processing": 0, "succeeded": 1}
        return MessageBatch.model_validate(
            {
                "id": batch_id,
                "archived_at": None,
                "cancel_initiated_at": None,
                "created_at": "2025-06-01T00:00:00Z",
                "ended_at": None,
                "expires_at": "2025-06-02T00:00:00Z",
                "processing_status": self.status,
                "request_counts": counts,
                "results_url": None,
                "type": "message_batch",
            }
        )

    async def results(self, batch_id: str) -> AsyncIterator[Any]:
        return rows_of(self.rows)


def connection_error() -> anthropic.APIConnectionError:
    request = httpx2.Request("POST", "http://127.0.0.1:9/v1/messages/batches")
    return anthropic.APIConnectionError(request=request)


@pytest.fixture
def fake() -> FakeBatches:
    return FakeBatches()


def batches_with(
    redis: Redis, fake: FakeBatches, monkeypatch: pytest.MonkeyPatch, **kw: Any
) -> MessageBatches:
    mb = MessageBatches(redis, settings(**kw))
    client = SimpleNamespace(messages=SimpleNamespace(batches=fake))
    monkeypatch.setattr(mb, "client", lambda cfg: client)
    return mb


async def test_send_due_sends_an_overdue_models_requests(
    redis: Redis, fake: FakeBatches, monkeypatch: pytest.MonkeyPatch
) -> None:
    mb = batches_with(redis, fake, monkeypatch, batch_wait=60.0)
    await park(redis, "j1", 11, "c-1")
    await park(redis, "j2", 12, "c-2")
    await redis.zadd(KEYS.models, {HAIKU: now_ms() - 61_000})  # waited long enough
    assert await mb.send_due() == 1
    assert fake.created == [
        [
            {"custom_id": "c-1", "params": order("c-1").params},
            {"custom_id": "c-2", "params": order("c-2").params},
        ]
    ]
    raw = await redis.hget(KEYS.open, "msgbatch_1")  # type: ignore[misc]
    assert raw is not None
    kept = json.loads(raw)
    assert kept["model"] == HAIKU
    assert kept["jobs"] == {"c-1": "j1", "c-2": "j2"}
    assert abs(kept["sent_ms"] - now_ms()) < 60_000
    assert await waiting(redis) == []
    assert await redis.zcard(KEYS.models) == 0
    assert await redis.zcard(KEYS.sending) == 0
    assert await redis.keys(KEYS.take("*")) == []
    assert await redis.exists(KEYS.send_lease) == 0  # the lease is given up
    assert mb.sent_here == 1
    assert mb.tally() == {"parked": 0, "resumed": 0, "sent": 1}


async def test_fleets_sharing_a_redis_send_and_look_at_only_their_own_batches(
    redis: Redis, fake: FakeBatches, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = FakeBatches()  # another fleet: its own account, its own servers
    theirs = MessageBatches(redis, settings(queue_name="staging", batch_queue_name="staging:b"))
    client = SimpleNamespace(messages=SimpleNamespace(batches=other))
    monkeypatch.setattr(theirs, "client", lambda cfg: client)
    ours = batches_with(redis, fake, monkeypatch, batch_wait=60.0)
    await park(redis, "j1", 11, "c-1")
    await redis.zadd(KEYS.models, {HAIKU: now_ms() - 61_000})
    assert await theirs.send_due() == 0  # not theirs to send
    assert other.created == []
    assert await ours.send_due() == 1
    assert [[r["custom_id"] for r in b] for b in fake.created] == [["c-1"]]
    assert await theirs.poll() == 0  # nor theirs to look at
    assert other.retrieved == []
    assert await redis.hlen(KEYS.open) == 1  # type: ignore[misc]


async def test_send_due_waits_for_a_young_small_batch(
    redis: Redis, fake: FakeBatches, monkeypatch: pytest.MonkeyPatch
) -> None:
    mb = batches_with(redis, fake, monkeypatch, batch_wait=60.0)
    await park(redis, "j1", 11, "c-1")
    assert await mb.send_due() == 0
    assert fake.created == []
    assert len(await waiting(redis)) == 1


async def test_send_due_sends_full_batches_at_once(
    redis: Redis, fake: FakeBatches, monkeypatch: pytest.MonkeyPatch
) -> None:
    mb = batches_with(redis, fake, monkeypatch, batch_size=2, batch_wait=60.0)
    for n in range(5):
        await park(redis, f"j{n}", n, f"c-{n}")
    assert await mb.send_due() == 2
    assert [[r["custom_id"] for r in sent] for sent in fake.created] == [
        ["c-0", "c-1"],
        ["c-2", "c-3"],
    ]
    assert len(await waiting(redis)) == 1  # too few, not yet overdue
    assert await redis.hlen(KEYS.open) == 2  # type: ignore[misc]


async def test_what_a_send_leaves_is_due_when_its_own_oldest_request_is(
    redis: Redis, fake: FakeBatches, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three requests, batches of two, the model overdue: one batch now; the third was
    parked just now, so it is scored at its parking time and waits."""
    mb = batches_with(redis, fake, monkeypatch, batch_size=2, batch_wait=60.0)
    for n in range(3):
        await park(redis, f"j{n}", n, f"c-{n}")
    await redis.zadd(KEYS.models, {HAIKU: 1})  # overdue
    assert await mb.send_due() == 1
    assert [len(sent) for sent in fake.created] == [2]
    left = await waiting(redis)
    assert len(left) == 1
    assert await redis.zscore(KEYS.models, HAIKU) == json.loads(left[0])["ms"]
    assert await mb.send_due() == 0


async def test_an_overdue_leftover_is_sent_at_once(
    redis: Redis, fake: FakeBatches, monkeypatch: pytest.MonkeyPatch
) -> None:
    mb = batches_with(redis, fake, monkeypatch, batch_size=2, batch_wait=60.0)
    for n in range(3):
        await park(redis, f"j{n}", n, f"c-{n}")
    key = KEYS.pending(HAIKU)
    for index, raw in enumerate(await waiting(redis)):  # parked long ago
        await redis.lset(
            key, index, json.dumps({**json.loads(raw), "ms": 1}, separators=(",", ":"))
        )  # type: ignore[misc]
    await redis.zadd(KEYS.models, {HAIKU: 1})
    assert await mb.send_due() == 2
    assert [len(sent) for sent in fake.created] == [2, 1]
    assert await waiting(redis) == []


async def test_send_due_puts_the_requests_back_when_the_batch_is_not_created(
    redis: Redis, fake: FakeBatches, monkeypatch: pytest.MonkeyPatch
) -> None:
    mb = batches_with(redis, fake, monkeypatch, batch_wait=60.0)
    await park(redis, "j1", 11, "c-1")
    await park(redis, "j2", 12, "c-2")
    before = await waiting(redis)
    await redis.zadd(KEYS.models, {HAIKU: 1})
    fake.fail = connection_error()
    assert await mb.send_due() == 0
    assert await waiting(redis) == before
    assert await redis.zscore(KEYS.models, HAIKU) is not None
    assert await redis.hlen(KEYS.open) == 0  # type: ignore[misc]
    assert await redis.zcard(KEYS.sending) == 0
    assert await redis.keys(KEYS.take("*")) == []
    assert await redis.exists(KEYS.send_lease) == 0
    assert mb.sent_here == 0


async def test_a_created_batch_is_recorded_through_a_redis_outage_not_sent_twice(
    redis: Redis, fake: FakeBatches, monkeypatch: pytest.MonkeyPatch
) -> None:
    mb = batches_with(redis, fake, monkeypatch, batch_wait=60.0)
    await park(redis, "j1", 11, "c-1")
    await redis.zadd(KEYS.models, {HAIKU: 1})
    record = mb._opened
    failures = 3

    async def through_an_outage(**kw: Any) -> Any:
        nonlocal failures
        if failures:  # Redis went away just after Anthropic created the batch
            failures -= 1
            raise RedisConnectionError("Connection refused")
        return await record(**kw)

    monkeypatch.setattr(mb, "_opened", through_an_outage)
    assert await mb.send_due() == 1
    assert failures == 0
    assert len(fake.created) == 1  # once: not given back to be sent again
    assert await redis.hexists(KEYS.open, "msgbatch_1")  # type: ignore[misc]
    assert await redis.zcard(KEYS.sending) == 0


async def test_send_due_without_the_lease_sends_nothing(
    redis: Redis, fake: FakeBatches, monkeypatch: pytest.MonkeyPatch
) -> None:
    mb = batches_with(redis, fake, monkeypatch)
    await fill(redis, [order("c-1").entry("j1")], oldest=1)
    await redis.set(KEYS.send_lease, "another worker")
    assert await mb.send_due() == 0
    assert fake.created == []
    assert await redis.get(KEYS.send_lease) == b"another worker"


async def test_send_due_leaves_another_workers_model(
    redis: Redis, fake: FakeBatches, monkeypatch: pytest.MonkeyPatch
) -> None:
    mb = batches_with(redis, fake, monkeypatch)
    other = "anthropic/claude-sonnet-4-6"
    items = [order("c-1", other).entry("j1")]
    await fill(redis, items, model=other, oldest=1)
    assert await mb.send_due() == 0
    assert fake.created == []
    assert await waiting(redis, other) == [e.encode() for e in items]
    assert await redis.zcard(KEYS.sending) == 0


async def test_send_due_returns_a_stale_take(
    redis: Redis, fake: FakeBatches, monkeypatch: pytest.MonkeyPatch
) -> None:
    mb = batches_with(redis, fake, monkeypatch, batch_wait=60.0)
    items = entries(3)
    await fill(redis, items)
    stale_at = now_ms() - SENDING_STALE_MS - 1_000
    await take(mb, 3, 10_000, "dead|" + HAIKU, at=stale_at)
    fresh = "alive|" + HAIKU
    await redis.rpush(KEYS.take(fresh), "x")  # type: ignore[misc]
    await redis.zadd(KEYS.sending, {fresh: now_ms()})
    assert await mb.send_due() == 0  # given back now: not overdue yet
    assert await waiting(redis) == [e.encode() for e in items]
    assert await redis.zrange(KEYS.sending, 0, -1) == [fresh.encode()]
    assert fake.created == []


def ended_row(custom_id: str, text: str) -> MessageBatchIndividualResponse:
    return MessageBatchIndividualResponse.model_validate(
        {
            "custom_id": custom_id,
            "result": {
                "type": "succeeded",
                "message": {
                    "id": "msg_1",
                    "type": "message",
                    "role": "assistant",
                    "model": "claude-haiku-4-5-20251001",
                    "content": [{"type": "text", "text": text}],
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": {"input_tokens": 10, "output_tokens": 5},
                },
            },
        }
    )


def errored_row(custom_id: str) -> MessageBatchIndividualResponse:
    return MessageBatchIndividualResponse.model_validate(
        {
            "custom_id": custom_id,
            "result": {
                "type": "errored",
                "error": {
                    "type": "error",
                    "error": {"type": "overloaded_error", "message": "Overloaded"},
                    "request_id": "req_1",
                },
            },
        }
    )


async def test_poll_brings_an_ended_batchs_results_back(
    redis: Redis, fake: FakeBatches, monkeypatch: pytest.MonkeyPatch
) -> None:
    mb = batches_with(redis, fake, monkeypatch, batch_size=3)
    await park(redis, "j1", 11, "c-1")
    await park(redis, "j2", 12, "c-2")
    await park(redis, "j3", 13, "c-3")
    assert await mb.send_due() == 1
    fake.status = "in_progress"
    assert await mb.poll() == 0
    assert fake.retrieved == ["msgbatch_1"]
    assert await redis.hlen(KEYS.open) == 1  # type: ignore[misc]
    assert await redis.exists(KEYS.poll_lease) == 0

    fake.status = "ended"
    fake.rows = [ended_row("c-1", "the answer"), ended_row("c-stranger", "?"), errored_row("c-3")]
    assert await mb.poll() == 3
    assert await redis.hlen(KEYS.open) == 0  # type: ignore[misc]
    assert await redis.zscore(BQ, "j1") == 11
    assert await redis.zscore(BQ, "j2") == 12
    assert await redis.zscore(BQ, "j3") == 13
    assert await redis.zcard(PARKED_KEY) == 0
    assert await redis.exists(KEYS.poll_lease) == 0
    assert mb.resumed_here == 3

    one = await mb.parked("j1")
    assert one is not None
    assert one.batch_id == "msgbatch_1"
    reply = reply_of(haiku(), one, 4096)
    assert reply.text == "the answer"
    assert reply.usage is not None
    assert reply.usage.input_tokens == 10
    assert reply.usage.output_tokens == 5

    two = await mb.parked("j2")  # the ended batch listed no result for it
    assert two is not None
    assert two.result is not None
    assert two.result["type"] == "errored"
    assert two.result["error"]["error"]["type"] == "missing_result"
    with pytest.raises(ModelCallError, match=r"^BatchErrored: missing_result: "):
        reply_of(haiku(), two, 4096)

    three = await mb.parked("j3")  # errored, as the SDK gives it
    assert three is not None
    with pytest.raises(ModelCallError, match=r"^BatchErrored: overloaded_error: Overloaded$"):
        reply_of(haiku(), three, 4096)

    assert await mb.poll() == 0  # nothing open any more
    assert fake.retrieved == ["msgbatch_1", "msgbatch_1"]


async def test_poll_keeps_a_batch_it_could_not_read(
    redis: Redis, fake: FakeBatches, monkeypatch: pytest.MonkeyPatch
) -> None:
    mb = batches_with(redis, fake, monkeypatch, batch_size=1)
    await park(redis, "j1", 11, "c-1")
    assert await mb.send_due() == 1
    fake.fail = connection_error()
    assert await mb.poll() == 0
    assert await redis.hlen(KEYS.open) == 1  # type: ignore[misc]
    assert await redis.zscore(PARKED_KEY, "j1") is not None
    assert await redis.exists(KEYS.poll_lease) == 0


async def test_poll_without_the_lease_looks_at_nothing(
    redis: Redis, fake: FakeBatches, monkeypatch: pytest.MonkeyPatch
) -> None:
    mb = batches_with(redis, fake, monkeypatch, batch_size=1)
    await park(redis, "j1", 11, "c-1")
    assert await mb.send_due() == 1
    await redis.set(KEYS.poll_lease, "another worker")
    assert await mb.poll() == 0
    assert fake.retrieved == []


async def test_a_poll_renews_its_short_lease_at_each_batch(
    redis: Redis, fake: FakeBatches, monkeypatch: pytest.MonkeyPatch
) -> None:
    mb = batches_with(redis, fake, monkeypatch)
    kept = json.dumps({"model": HAIKU, "sent_ms": 1, "jobs": {}})
    await redis.hset(KEYS.open, mapping={"msgbatch_a": kept, "msgbatch_b": kept})  # type: ignore[misc]
    fake.status = "in_progress"
    left: list[int] = []
    retrieve = fake.retrieve

    async def slow_retrieve(batch_id: str) -> MessageBatch:
        left.append(await redis.pttl(KEYS.poll_lease))
        await redis.pexpire(KEYS.poll_lease, 1000)  # as if this batch took 29 s
        return await retrieve(batch_id)

    monkeypatch.setattr(fake, "retrieve", slow_retrieve)
    assert await mb.poll() == 0
    assert len(left) == 2
    assert all(20_000 < ms <= 30_000 for ms in left), left  # renewed before each batch
    assert await redis.exists(KEYS.poll_lease) == 0


async def test_the_client_speaks_to_the_configured_base(redis: Redis) -> None:
    cfg = haiku(api_base="http://127.0.0.1:9/v1/messages")
    mb = MessageBatches(redis, Settings(chains={"default": [cfg]}))
    client = mb.client(cfg)
    assert str(client.base_url).rstrip("/") == "http://127.0.0.1:9"
    assert mb.client(cfg) is client
    assert set(mb.models) == {HAIKU}
    await mb.aclose()


# -- a parked job that stops waiting -------------------------------------------------------


async def park_until(redis: Redis, job_id: str, score: int, custom_id: str, deadline: int) -> None:
    queue = RedisQueue(redis, the_lanes(), token="me", lease_ms=10_000)
    o = order(custom_id)
    stop = Parking(o.model, o.custom_id, o.state(), o.entry(job_id), PARK_KEEP_MS, deadline)
    assert await queue.park(await claimed(redis, job_id, score), stop)


async def test_a_released_job_goes_back_marked_stopped_once(redis: Redis) -> None:
    await park_until(redis, "j1", 1234, "c-1", now_ms() + 60_000)
    assert await redis.zscore(PARKED_DEADLINES_KEY, "j1") is not None
    mb = MessageBatches(redis, settings())
    assert await mb.release("j1") is True
    assert await redis.zscore(BQ, "j1") == 1234  # its old place: a worker claims it now
    assert await redis.llen(wake_key(BQ)) == 1  # type: ignore[misc]
    assert await redis.zscore(PARKED_KEY, "j1") is None
    assert await redis.zscore(PARKED_DEADLINES_KEY, "j1") is None
    parked = await mb.parked("j1")
    assert parked is not None
    assert parked.stopped
    assert parked.result is None
    with pytest.raises(ModelCallError, match=r"^BatchAbandoned"):
        reply_of(haiku(), parked, 100)
    assert await mb.release("j1") is False  # once
    # Its batch's answer, should it come, is dropped... once it is finished; until then
    # it is kept but the job is not queued again by it.
    assert await mb.release("never-parked") is False


async def test_only_jobs_past_their_deadline_are_released(redis: Redis) -> None:
    await park_until(redis, "late", 1, "c-1", now_ms() - 5_000)
    await park_until(redis, "soon", 2, "c-2", now_ms() + 60_000)
    await park(redis, "none", 3, "c-3")
    mb = MessageBatches(redis, settings())
    assert await mb.release_overdue() == 1
    assert await redis.zscore(PARKED_KEY, "late") is None
    assert await redis.zscore(PARKED_KEY, "soon") is not None
    assert await redis.zscore(PARKED_KEY, "none") is not None
    assert await redis.zrange(PARKED_DEADLINES_KEY, 0, -1) == [b"soon"]


async def test_a_cancel_nobody_heard_releases_its_parked_job_at_the_next_sweep(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("llm_router.worker.batches.SWEEP_CHUNK", 4)
    count = 9  # three pages, the last one short
    for n in range(count):
        await park(redis, f"p{n}", n, f"c-{n}")
    cancelled = {"p3", f"p{count - 1}"}
    for job_id in cancelled:  # what RouterClient.cancel leaves when nobody listens
        await redis.set(cancel_key(job_id), "1")
    await redis.set(cancel_key("never-parked"), "1")
    mb = MessageBatches(redis, settings())
    assert await mb.release_cancelled() == 2
    for job_id in cancelled:
        parked = await mb.parked(job_id)
        assert parked is not None
        assert parked.stopped
        assert await redis.zscore(BQ, job_id) is not None  # back in its queue, to end
    assert await redis.zcard(PARKED_KEY) == count - 2
    # One sweep a minute for the whole fleet, and one by each worker as it starts.
    await redis.set(cancel_key("p7"), "1")
    assert await MessageBatches(redis, settings()).release_cancelled() == 0
    assert 0 < await redis.pttl(MSGBATCH_SWEEP_LEASE) <= 60_000
    assert await MessageBatches(redis, settings()).release_cancelled(at_start=True) == 1
    await redis.set(cancel_key("p6"), "1")
    await redis.delete(MSGBATCH_SWEEP_LEASE)
    assert await mb.release_cancelled() == 1


async def test_a_stopped_or_vanished_jobs_request_is_not_sent(
    redis: Redis, fake: FakeBatches, monkeypatch: pytest.MonkeyPatch
) -> None:
    mb = batches_with(redis, fake, monkeypatch, batch_wait=60.0)
    await park(redis, "kept", 11, "c-1")
    await park(redis, "cancelled", 12, "c-2")
    await park(redis, "deleted", 13, "c-3")
    assert await mb.release("cancelled")
    await redis.delete(parked_key("deleted"))
    await redis.zadd(KEYS.models, {HAIKU: now_ms() - 61_000})
    assert await mb.send_due() == 1
    assert [[r["custom_id"] for r in batch] for batch in fake.created] == [["c-1"]]


async def test_a_take_of_only_stopped_requests_sends_nothing_and_is_dropped(
    redis: Redis, fake: FakeBatches, monkeypatch: pytest.MonkeyPatch
) -> None:
    mb = batches_with(redis, fake, monkeypatch, batch_wait=60.0)
    await park(redis, "cancelled", 12, "c-2")
    assert await mb.release("cancelled")
    await redis.zadd(KEYS.models, {HAIKU: now_ms() - 61_000})
    assert await mb.send_due() == 0
    assert fake.created == []
    assert await redis.zcard(KEYS.sending) == 0
    assert await waiting(redis) == []


async def test_put_back_of_many_rows_in_one_round_trip(redis: Redis) -> None:
    for n in range(3):
        await park(redis, f"j{n}", 100 + n, f"c-{n}")
    mb = MessageBatches(redis, settings())
    rows = [("j0", "c-0", {"type": "expired"}), ("j1", "c-other", {"type": "expired"}),
            ("j2", "c-2", {"type": "canceled"})]  # fmt: skip
    assert await mb._put_back(rows, "b") == 2
    assert await redis.zscore(BQ, "j0") == 100
    assert await redis.zscore(BQ, "j2") == 102
    assert await redis.zscore(PARKED_KEY, "j1") is not None  # not its request: still parked
    assert await mb._put_back([], "b") == 0
