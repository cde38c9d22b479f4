"""The response cache on fakeredis: what the key covers, what is stored and answered, and
that Redis trouble is a miss, never a failed job."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from pydantic import SecretStr
from redis.asyncio import Redis
from structlog.testing import capture_logs

from llm_router.client.cache import count_entries, parse_stats, purge, read_stats
from llm_router.client.cli import _parser
from llm_router.client.client import build_request
from llm_router.client.counters import CACHE_HITS_FIELD, cache_hits
from llm_router.client.keys import CACHE_MATCH, CACHE_PREFIX, CACHE_STATS_KEY, METRICS_COUNTERS_KEY
from llm_router.client.protocol import Attempt, RouteRequest, RouteResult
from llm_router.client.rows import RowParser, RowRef, canonical_request, job_id_for, output_row
from llm_router.worker import router as router_module
from llm_router.worker.cache import (
    Entry,
    ResponseCache,
    entry_blob,
    entry_key,
    entry_result,
)
from llm_router.worker.calls import Reply
from llm_router.worker.metrics import event_payload
from llm_router.worker.router import Router
from llm_router.worker.settings import Deployment, ModelConfig, Settings

QWEN, HAIKU = "ollama_chat/unit-qwen", "anthropic/unit-haiku"
CHAIN = [
    ModelConfig(model=QWEN, timeout=1, api_base="http://127.0.0.1:9"),
    ModelConfig(model=HAIKU, timeout=1, api_key=SecretStr("sk-ant-unit-0")),
]
SCHEMA: dict[str, Any] = {"type": "object", "properties": {"a": {"type": "string"}}}


def request(**fields: Any) -> RouteRequest:
    fields.setdefault("messages", [{"role": "user", "content": "Is water wet?"}])
    fields.setdefault("chain", "default")
    return RouteRequest.model_validate(fields)


def key(req: RouteRequest, models: list[ModelConfig] = CHAIN, chain: str = "default") -> str:
    return entry_key(chain, models, req)


def ok_result(**fields: Any) -> RouteResult:
    values: dict[str, Any] = {
        "status": "ok",
        "content": {"a": "yes"},
        "raw_text": '{"a": "yes"}',
        "model_used": HAIKU,
        "attempts": [Attempt(model=HAIKU, outcome="success", latency_ms=40, cost_usd=0.002)],
        "latency_ms": 41,
        "job_id": "j1",
        "context": "first.caller",
        "chain": "default",
        "metadata": {"row": 1},
        "cost_usd": 0.002,
    }
    return RouteResult(**(values | fields))


# --- the key --------------------------------------------------------------------------------


def test_the_key_is_a_sha256_under_the_prefix() -> None:
    made = key(request())
    assert made.startswith(CACHE_PREFIX)
    digest = made.removeprefix(CACHE_PREFIX)
    assert len(digest) == 64
    assert set(digest) <= set("0123456789abcdef")
    assert made != CACHE_STATS_KEY


@pytest.mark.parametrize(
    "change",
    [
        {"messages": [{"role": "user", "content": "Is water dry?"}]},
        {"messages": [{"role": "system", "content": "Is water wet?"}]},
        {"messages": [{"role": "user", "content": "Is water wet?", "name": "bob"}]},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Is water wet?"},
            ]
        },
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Is water wet?"}]}]},
        {"schema": SCHEMA},
        {"schema": {**SCHEMA, "required": ["a"]}},
    ],
    ids=["content", "role", "extra field", "another message", "blocks", "schema", "schema2"],
)
def test_the_key_differs_when_the_question_differs(change: dict[str, Any]) -> None:
    assert key(request(**change)) != key(request())


def test_the_key_differs_per_chain_name() -> None:
    assert key(request(), chain="batch") != key(request(), chain="default")


@pytest.mark.parametrize(
    "model",
    [
        ModelConfig(model="ollama_chat/unit-llama", timeout=1),
        ModelConfig(model=QWEN, timeout=1, params={"temperature": 0.7}),
        ModelConfig(model=QWEN, timeout=1, structured_output=False),
        ModelConfig(
            model=QWEN,
            timeout=1,
            deployments=[Deployment(api_base="http://a:1", params={"seed": 1})],
        ),
    ],
    ids=["model name", "params", "structured_output", "deployment params"],
)
def test_the_key_differs_when_a_model_would_answer_differently(model: ModelConfig) -> None:
    assert key(request(), [model, CHAIN[1]]) != key(request())


def test_the_key_ignores_what_does_not_change_the_answer() -> None:
    plain = key(request())
    same = [
        request(context="another.caller"),
        request(metadata={"row": 99, "tags": ["x"]}),
        request(v=2, expires_in=30),
        request(v=3, cache_ttl=60),
        request(v=3, cache_ttl=86_400, metadata={"other": True}, context="c"),
    ]
    assert {key(r) for r in same} == {plain}
    # Timeouts, keys, servers and slots change whether an answer comes, not which.
    moved = [
        ModelConfig(model=QWEN, timeout=30, api_base="http://10.0.0.2:11434", max_in_flight=2),
        ModelConfig(model=HAIKU, timeout=9, api_key=SecretStr("sk-ant-unit-other"), max_retries=5),
    ]
    assert key(request(), moved) == plain


def test_the_key_does_not_depend_on_the_order_of_keys() -> None:
    one = request(schema={"type": "object", "properties": {"a": {}, "b": {}}})
    two = request(schema={"properties": {"b": {}, "a": {}}, "type": "object"})
    assert key(one) == key(two)


# --- ttl and entries ------------------------------------------------------------------------


def test_the_request_ttl_wins_and_zero_turns_the_default_off() -> None:
    cache = ResponseCache(None, defaults={"default": 600})
    assert cache.ttl(request()) == 600
    assert cache.ttl(request(v=3, cache_ttl=5)) == 5
    assert cache.ttl(request(v=3, cache_ttl=0)) == 0
    assert cache.ttl(request(chain="other")) == 0


async def test_no_entry_without_redis_ttl_or_known_chain(redis: Redis) -> None:
    chains = {"default": CHAIN}
    assert await ResponseCache(None).entry(request(v=3, cache_ttl=60), chains) is None
    cache = ResponseCache(redis, defaults={"default": 0})
    assert await cache.entry(request(), chains) is None
    assert await cache.entry(request(v=3, cache_ttl=60, chain="nope"), chains) is None
    found = await cache.entry(request(v=3, cache_ttl=60), chains)
    assert found == Entry(key(request()), 60)


def test_a_stored_entry_is_small_json_without_the_job() -> None:
    blob = entry_blob(ok_result(), 120)
    assert blob.startswith(b'{"kept_ms":120000,')  # where the lookup script reads it
    data = json.loads(blob)
    assert set(data) == {"kept_ms", "v", "status", "content", "raw_text", "model_used"} | {
        "chain",
        "cost_usd",
    }
    assert entry_result(blob).content == {"a": "yes"}


def test_a_text_answer_is_stored_once() -> None:
    blob = entry_blob(ok_result(content="hello there", raw_text="hello there"), 60)
    assert blob.count(b"hello there") == 1
    back = entry_result(blob)
    assert (back.content, back.raw_text) == ("hello there", "hello there")


@pytest.mark.parametrize("blob", [b"not json", b"[1]", b'{"status": "failed"}'])
def test_an_entry_that_is_not_an_ok_result_is_refused(blob: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - any ValueError: it is a miss
        entry_result(blob)


# --- get and put ----------------------------------------------------------------------------


async def test_put_then_get_and_the_counters(redis: Redis) -> None:
    cache = ResponseCache(redis)
    entry = Entry(key(request()), 60)
    assert await cache.get(entry) is None
    assert await cache.put(entry, ok_result()) is True
    found = await cache.get(entry)
    assert found is not None
    assert (found.content, found.model_used, found.raw_text) == (
        {"a": "yes"},
        HAIKU,
        '{"a": "yes"}',
    )
    assert 55 <= await redis.ttl(entry.key) <= 60
    stats = parse_stats(await redis.hgetall(CACHE_STATS_KEY))  # type: ignore[misc]
    assert (stats.hits, stats.misses, stats.stores) == (1, 1, 1)
    assert stats.hit_ratio == 0.5


@pytest.mark.parametrize(
    "result",
    [
        RouteResult(status="failed", error="all 2 models failed", chain="default"),
        RouteResult(status="invalid_request", error="invalid request: x"),
        RouteResult(status="expired", error="expired: before"),
        RouteResult(status="cancelled", error="cancelled: before"),
        ok_result(cached=True),
    ],
    ids=["failed", "invalid", "expired", "cancelled", "a hit itself"],
)
async def test_only_ok_answers_are_stored(redis: Redis, result: RouteResult) -> None:
    cache = ResponseCache(redis)
    entry = Entry(key(request()), 60)
    assert await cache.put(entry, result) is False
    assert await redis.exists(entry.key) == 0
    assert await redis.hget(CACHE_STATS_KEY, "stores") is None  # type: ignore[misc]


async def test_an_entry_older_than_the_request_takes_is_a_miss(redis: Redis) -> None:
    entry_key_ = key(request())
    # Stored for 100 s, 50 s left: 50 s old.
    await redis.set(entry_key_, entry_blob(ok_result(), 100), ex=50)
    cache = ResponseCache(redis)
    assert await cache.get(Entry(entry_key_, 10)) is None
    assert await cache.get(Entry(entry_key_, 60)) is not None
    stats = parse_stats(await redis.hgetall(CACHE_STATS_KEY))  # type: ignore[misc]
    assert (stats.hits, stats.misses) == (1, 1)


async def test_an_unreadable_entry_is_a_miss(redis: Redis) -> None:
    entry = Entry(key(request()), 60)
    await redis.set(entry.key, b'{"kept_ms":60000,"status":"ok","content":', ex=60)
    with capture_logs() as logs:
        assert await ResponseCache(redis).get(entry) is None
    assert [r["event"] for r in logs] == ["cache_entry_unreadable"]


async def test_redis_errors_are_a_miss_and_a_logged_store(broken_redis: Redis) -> None:
    cache = ResponseCache(broken_redis)
    entry = Entry(key(request()), 60)
    secret = "the prompt and its answer stay out of the log"
    with capture_logs() as logs:
        assert await cache.get(entry) is None
        assert await cache.answer(entry, request(), "j2") is None
        assert await cache.put(entry, ok_result(content=secret, raw_text=secret)) is False
    events = [(r["event"], r["log_level"]) for r in logs]
    assert events == [
        ("cache_lookup_failed", "warning"),
        ("cache_lookup_failed", "warning"),
        ("cache_store_failed", "warning"),
    ]
    assert secret not in repr(logs)


async def test_without_redis_nothing_happens() -> None:
    cache = ResponseCache(None)
    entry = Entry(key(request()), 60)
    assert await cache.get(entry) is None
    assert await cache.put(entry, ok_result()) is False


async def test_a_hit_answers_with_this_request_labels_and_nothing_spent(redis: Redis) -> None:
    cache = ResponseCache(redis)
    first = request(v=3, cache_ttl=60, context="first.caller", metadata={"row": 1})
    entry = await cache.entry(first, {"default": CHAIN})
    assert entry is not None
    await cache.put(entry, ok_result())
    again = request(v=3, cache_ttl=60, context="second.caller", metadata={"row": 2})
    hit = await cache.answer(await cache.entry(again, {"default": CHAIN}), again, "j2")
    assert hit is not None
    assert hit.cached is True
    assert (hit.status, hit.content, hit.model_used) == ("ok", {"a": "yes"}, HAIKU)
    assert (hit.job_id, hit.context, hit.metadata) == ("j2", "second.caller", {"row": 2})
    assert hit.attempts == []
    assert hit.cost_usd == 0.0


# --- through the Router ----------------------------------------------------------------------


class Calls:
    """Stands in for ``call_model``; counts the calls per model."""

    def __init__(self, replies: dict[str, str]) -> None:
        self.replies = replies
        self.models: list[str] = []

    async def __call__(
        self, cfg: ModelConfig, messages: Any, schema: Any = None, **_: Any
    ) -> Reply:
        self.models.append(cfg.model)
        await asyncio.sleep(0)
        return Reply(self.replies[cfg.model])


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Calls:
    fake = Calls({QWEN: "I cannot help with that.", HAIKU: "Yes, water is wet."})
    monkeypatch.setattr(router_module, "call_model", fake)
    return fake


def settings(**cache_ttl: int) -> Settings:
    return Settings(chains={"default": CHAIN, "other": CHAIN}, cache_ttl=cache_ttl)


async def test_the_second_identical_request_calls_no_model(redis: Redis, calls: Calls) -> None:
    router = Router(settings(), redis=redis)
    first = await router.run(request(v=3, cache_ttl=300, context="a"), job_id="r1")
    assert isinstance(first, RouteResult)
    assert calls.models == [QWEN, HAIKU]
    second = await router.run(request(v=3, cache_ttl=300, context="b"), job_id="r2")
    assert isinstance(second, RouteResult)
    assert calls.models == [QWEN, HAIKU]  # nothing called this time
    assert second.cached is True
    assert (second.content, second.model_used) == ("Yes, water is wet.", HAIKU)
    assert (second.attempts, second.cost_usd, second.context) == ([], 0.0, "b")
    assert first.cached is False
    raw = await redis.hgetall(METRICS_COUNTERS_KEY)  # type: ignore[misc]
    assert cache_hits(raw) == 1
    assert raw[f"{HAIKU}|success".encode()] == b"1"  # the hit counts no model


async def test_the_chain_default_caches_and_zero_turns_it_off(redis: Redis, calls: Calls) -> None:
    router = Router(settings(default=600), redis=redis)
    await router.run(request())
    hit = await router.run(request())
    assert isinstance(hit, RouteResult)
    assert hit.cached is True
    off = await router.run(request(v=3, cache_ttl=0))
    assert isinstance(off, RouteResult)
    assert off.cached is False
    other = await router.run(request(chain="other"))  # no default there
    assert isinstance(other, RouteResult)
    assert other.cached is False
    assert calls.models == [QWEN, HAIKU] * 3


async def test_a_failed_answer_is_not_cached(redis: Redis, calls: Calls) -> None:
    calls.replies[HAIKU] = "I cannot do that either."
    router = Router(settings(default=600), redis=redis)
    for _ in range(2):
        result = await router.run(request())
        assert isinstance(result, RouteResult)
        assert result.status == "failed"
    assert calls.models == [QWEN, HAIKU] * 2
    assert await count_entries(redis) == 0


async def test_in_process_without_redis_never_caches(calls: Calls) -> None:
    router = Router(settings(default=600))
    for _ in range(2):
        result = await router.run(request(v=3, cache_ttl=60))
        assert isinstance(result, RouteResult)
        assert result.cached is False
    assert calls.models == [QWEN, HAIKU] * 2


async def test_a_broken_redis_routes_every_time(broken_redis: Redis, calls: Calls) -> None:
    router = Router(settings(default=600), redis=broken_redis)
    for _ in range(2):
        result = await router.run(request())
        assert isinstance(result, RouteResult)
        assert result.ok
        assert result.cached is False
    assert calls.models == [QWEN, HAIKU] * 2


def test_the_event_says_cached() -> None:
    event = event_payload(ok_result(cached=True, attempts=[], cost_usd=0.0), {})
    assert event["cached"] is True
    assert event_payload(ok_result(), {})["cached"] is False


# --- the command's side: stats and purge -----------------------------------------------------


async def test_stats_count_entries_and_purge_empties_without_the_counters(redis: Redis) -> None:
    cache = ResponseCache(redis)
    for n in range(7):
        await cache.put(Entry(key(request(messages=[{"role": "user", "content": str(n)}])), 60),
                        ok_result())  # fmt: skip
    await redis.set("llm_router:cachex", b"1")  # not an entry
    stats = await read_stats(redis)
    assert (stats.entries, stats.stores, stats.hit_ratio) == (7, 7, None)
    assert await purge(redis, batch=3) == 7
    assert await count_entries(redis) == 0
    assert await redis.exists(CACHE_STATS_KEY, "llm_router:cachex") == 2
    assert (await read_stats(redis)).stores == 7


def test_the_scan_pattern_matches_entries_only() -> None:
    assert CACHE_MATCH.startswith(CACHE_PREFIX)
    assert len(CACHE_MATCH) == len(CACHE_PREFIX) + 64
    assert CACHE_HITS_FIELD == "cache_hits"
    assert "|" not in CACHE_HITS_FIELD  # never read as a model's counter


# --- the producer's side: requests, backfill rows, the command -----------------------------


def test_a_request_with_cache_ttl_is_version_3() -> None:
    asked = build_request("hi", cache_ttl=60)
    assert (asked.v, asked.cache_ttl, asked.wire()["v"]) == (3, 60, 3)
    assert "v" not in build_request("hi").wire()


def test_backfill_rows_carry_the_cache_ttl() -> None:
    line = b'{"id": "a", "prompt": "hi"}'
    cached = RowParser(cache_ttl=600).request(RowParser.claim(1, line))
    plain = RowParser().request(RowParser.claim(1, line))
    assert (cached.v, cached.cache_ttl) == (3, 600)
    assert (plain.v, plain.cache_ttl) == (1, None)
    assert b'"cache_ttl":600' in canonical_request(cached)
    assert job_id_for("out", "a", cached) != job_id_for("out", "a", plain)
    with pytest.raises(ValueError, match="cache_ttl"):
        RowParser(cache_ttl=-1)


def test_a_cached_output_row_says_so() -> None:
    row = output_row(RowRef.of("r1", 3, None), ok_result(cached=True, attempts=[], cost_usd=0))
    assert (row["cached"], row["attempts"], row["cost_usd"]) == (True, [], 0)
    assert "cached" not in output_row(RowRef.of("r1", 3, None), ok_result())


@pytest.mark.parametrize(
    ("argv", "ttl"),
    [
        (["backfill", "in.jsonl", "--output", "o.jsonl", "--cache-ttl", "86400"], 86_400),
        (["backfill", "in.jsonl", "--output", "o.jsonl"], None),
        (["route", "hi", "--cache-ttl", "0"], 0),
    ],
)
def test_the_command_takes_cache_ttl(argv: list[str], ttl: int | None) -> None:
    assert _parser().parse_args(argv).cache_ttl == ttl


@pytest.mark.parametrize("bad", ["-1", "2592001", "1.5", "soon"])
def test_the_command_refuses_a_bad_cache_ttl(bad: str) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["backfill", "in.jsonl", "--output", "o.jsonl", "--cache-ttl", bad])


def test_the_cache_command_has_stats_and_purge() -> None:
    stats = _parser().parse_args(["cache", "stats", "--json"])
    assert (stats.command, stats.verb, stats.json) == ("cache", "stats", True)
    assert _parser().parse_args(["cache", "purge"]).verb == "purge"
