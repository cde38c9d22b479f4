"""The response cache end to end: real Redis, a real worker process, stub models that
record every request. A hit must reach no model at all.

The tests share this module's worker and Redis database: each uses prompts of its own
(a fresh marker), so their entries never meet; the purge test empties the cache last.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from llm_router.client import RouterClient
from llm_router.client.cache import count_entries
from llm_router.client.counters import cache_hits
from llm_router.client.keys import METRICS_COUNTERS_KEY
from llm_router.client.protocol import RouteResult
from llm_router_testing.servers import RedisServer
from llm_router_testing.stubs import StubServer
from tests.integration.conftest import (
    REDIS_URL,
    WorkerProcess,
    cloud_model,
    router_cli,
    worker_env,
)
from tests.integration.test_acl import WORKER_ACL
from tests.integration.test_routing import HAIKU, QWEN, SCHEMA, next_event

pytestmark = pytest.mark.integration

#: The chain whose requests are cached without asking (the worker's cache_ttl setting).
CACHED_CHAIN = "cached"


def marker() -> str:
    return uuid.uuid4().hex


@pytest.fixture(scope="module")
def cache_stub() -> Iterator[StubServer]:
    with StubServer() as server:
        yield server


@pytest.fixture(scope="module")
def lane() -> dict[str, str]:
    tag = uuid.uuid4().hex[:8]
    return {"queue": f"llm_router:test:cache:{tag}", "channel": f"llm_router_test_cache_{tag}"}


@pytest.fixture(scope="module")
def cache_worker(
    redis_available: str,
    cache_stub: StubServer,
    lane: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[WorkerProcess]:
    local = {"model": QWEN, "timeout": 5.0, "api_base": cache_stub.url, "breaker_failures": 1000}
    chain = [local, {**cloud_model(cache_stub.url), "breaker_failures": 1000}]
    env = worker_env(
        redis_url=redis_available,
        queue_name=lane["queue"],
        chains=json.dumps({"default": chain, CACHED_CHAIN: chain}),
        cache_ttl=json.dumps({CACHED_CHAIN: 600}),
        metrics_channel=lane["channel"],
        max_jobs="20",
        poll_delay="0.05",
    )
    proc = WorkerProcess(env, tmp_path_factory.mktemp("cache") / "worker.log").start()
    yield proc
    proc.stop()


@pytest.fixture
async def client(cache_worker: WorkerProcess, lane: dict[str, str]) -> AsyncIterator[RouterClient]:
    async with RouterClient(REDIS_URL, queue_name=lane["queue"]) as c:
        yield c


def calls_with(stub: StubServer, tag: str) -> int:
    """Model calls (not warm-ups) whose messages carry ``tag``."""
    return sum(1 for r in stub.requests if r.behaviour is not None and tag in json.dumps(r.body))


async def counted_hits(redis: Redis) -> int:
    return cache_hits(await redis.hgetall(METRICS_COUNTERS_KEY))  # type: ignore[misc]


async def test_the_second_identical_request_calls_no_model(
    client: RouterClient, cache_stub: StubServer, redis: Redis, lane: dict[str, str]
) -> None:
    tag = marker()
    prompt = f"stub:qwen=refusal {tag}"  # the local model refuses: Haiku answers, at a cost
    first = await client.route(prompt, cache_ttl=600, context="first", metadata={"n": 1})
    assert (first.model_used, first.cached) == (HAIKU, False)
    assert first.cost_usd > 0
    assert calls_with(cache_stub, tag) == 2  # Qwen, then Haiku
    hits_before = await counted_hits(redis)
    pubsub = redis.pubsub()
    await pubsub.subscribe(lane["channel"])
    try:
        handle = await client.enqueue(prompt, cache_ttl=600, context="second", metadata={"n": 2})
        second = await handle.result(timeout=20)
        event = await next_event(pubsub, handle.job_id)
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    assert calls_with(cache_stub, tag) == 2  # not one more call
    assert second.cached is True
    assert (second.status, second.model_used) == ("ok", HAIKU)
    assert (second.content, second.raw_text) == (first.content, first.raw_text)
    assert (second.attempts, second.cost_usd) == ([], 0.0)
    assert (second.context, second.metadata, second.job_id) == ("second", {"n": 2}, handle.job_id)
    assert (event["cached"], event["attempts"], event["cost_usd"]) == (True, [], 0.0)
    assert event["status"] == "ok"
    assert await counted_hits(redis) == hits_before + 1


async def test_a_different_schema_misses(client: RouterClient, cache_stub: StubServer) -> None:
    tag = marker()
    prompt = f"stub:qwen=json {tag}"
    other = {**SCHEMA, "properties": {**SCHEMA["properties"], "note": {"type": "string"}}}
    first = await client.route(prompt, schema=SCHEMA, cache_ttl=600)
    assert (first.content, first.cached) == ({"answer": "qwen", "ok": True}, False)
    missed = await client.route(prompt, schema=other, cache_ttl=600)
    assert missed.cached is False
    assert calls_with(cache_stub, tag) == 2
    again = await client.route(prompt, schema=SCHEMA, cache_ttl=600)
    assert again.cached is True
    assert calls_with(cache_stub, tag) == 2


async def test_a_chain_default_caches_a_request_that_did_not_ask(
    client: RouterClient, cache_stub: StubServer
) -> None:
    tag = marker()
    first = await client.route(f"say hi {tag}", chain=CACHED_CHAIN)
    second = await client.route(f"say hi {tag}", chain=CACHED_CHAIN)
    assert (first.cached, second.cached) == (False, True)
    assert second.content == first.content
    assert calls_with(cache_stub, tag) == 1
    # The same question on a chain without a default is neither looked up nor kept.
    plain = [await client.route(f"say hi {tag}") for _ in range(2)]
    assert [r.cached for r in plain] == [False, False]
    assert calls_with(cache_stub, tag) == 3


async def test_cache_ttl_zero_turns_the_chain_default_off(
    client: RouterClient, cache_stub: StubServer
) -> None:
    tag = marker()
    off = [await client.route(f"say hi {tag}", chain=CACHED_CHAIN, cache_ttl=0) for _ in range(2)]
    assert [r.cached for r in off] == [False, False]
    assert calls_with(cache_stub, tag) == 2
    # Nor was either answer kept: the chain's default now misses once, then hits.
    on = [await client.route(f"say hi {tag}", chain=CACHED_CHAIN) for _ in range(2)]
    assert [r.cached for r in on] == [False, True]
    assert calls_with(cache_stub, tag) == 3


async def test_a_failed_answer_is_never_kept(client: RouterClient, cache_stub: StubServer) -> None:
    tag = marker()
    prompt = f"stub:qwen=refusal stub:haiku=refusal {tag}"
    for _ in range(2):
        handle = await client.enqueue(prompt, cache_ttl=600)
        result = await handle.result(timeout=20, raise_on_failure=False)
        assert (result.status, result.cached) == ("failed", False)
    assert calls_with(cache_stub, tag) == 4


def _backfill(
    source: Path, output: Path, batch_queue: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "llm_router.client.cli", "--redis-url", REDIS_URL]
    argv += ["backfill", str(source), "--output", str(output), "--batch-queue", batch_queue]
    return subprocess.run(
        [*argv, *extra], capture_output=True, text=True, timeout=120, env=worker_env()
    )


def _rows(path: Path) -> dict[str, dict[str, Any]]:
    return {row["id"]: row for row in map(json.loads, path.read_text().splitlines())}


async def test_a_backfill_run_again_is_answered_from_the_cache(
    cache_worker: WorkerProcess, cache_stub: StubServer, lane: dict[str, str], tmp_path: Path
) -> None:
    tag = marker()
    source = tmp_path / "rows.jsonl"
    lines = [
        json.dumps({"id": f"r{n}", "prompt": f"{'stub:qwen=refusal ' if n % 4 == 0 else ''}"
                                             f"row {n} {tag}"})
        for n in range(20)
    ]  # fmt: skip
    source.write_text("\n".join(lines) + "\n")
    batch_queue = lane["queue"] + ":batch"
    first = _backfill(source, tmp_path / "one.jsonl", batch_queue, "--cache-ttl", "600")
    assert first.returncode == 0, first.stderr
    calls = calls_with(cache_stub, tag)
    assert calls == 20 + 5  # five rows refused by Qwen went on to Haiku
    second = _backfill(source, tmp_path / "two.jsonl", batch_queue, "--cache-ttl", "600")
    assert second.returncode == 0, second.stderr
    assert calls_with(cache_stub, tag) == calls  # not one model call
    one, two = _rows(tmp_path / "one.jsonl"), _rows(tmp_path / "two.jsonl")
    assert set(two) == set(one) == {f"r{n}" for n in range(20)}
    for row_id, row in two.items():
        assert (row["status"], row["cached"], row["attempts"]) == ("ok", True, [])
        assert row["cost_usd"] == 0.0
        assert (row["content"], row["model_used"]) == (
            one[row_id]["content"],
            one[row_id]["model_used"],
        )
        assert "cached" not in one[row_id]
    assert sum(r["cost_usd"] for r in one.values()) > 0


def _stats() -> dict[str, Any]:
    done = router_cli("cache", "stats", "--json")
    assert done.returncode == 0, done.stderr
    stats: dict[str, Any] = json.loads(done.stdout)
    return stats


async def test_cache_stats_shows_the_hit_and_purge_empties_it(
    client: RouterClient, cache_stub: StubServer, redis: Redis
) -> None:
    tag = marker()
    before = _stats()
    await client.route(f"say hi {tag}", cache_ttl=600)
    hit: RouteResult = await client.route(f"say hi {tag}", cache_ttl=600)
    assert hit.cached is True
    after = _stats()
    assert after["hits"] == before["hits"] + 1
    assert after["misses"] == before["misses"] + 1
    assert after["stores"] == before["stores"] + 1
    assert after["entries"] == await count_entries(redis) >= 1
    assert after["hit_ratio"] == pytest.approx(after["hits"] / (after["hits"] + after["misses"]))
    text = router_cli("cache", "stats")
    assert text.returncode == 0, text.stderr
    assert f"hits       {after['hits']}" in text.stdout
    assert "hit ratio" in text.stdout
    purged = router_cli("cache", "purge")
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout.strip() == f"purged {after['entries']} cache entries"
    assert _stats()["entries"] == 0
    missed = await client.route(f"say hi {tag}", cache_ttl=600)
    assert missed.cached is False
    assert calls_with(cache_stub, tag) == 2


async def test_the_least_privilege_worker_looks_up_and_stores_without_a_refusal(
    cache_stub: StubServer, tmp_path: Path
) -> None:
    """docs/protocol.md's worker ACL line: the lookup script (GET, PTTL, HINCRBY) and the
    store (SET EX, HINCRBY) are all it needs; not one refusal in ACL LOG."""
    admin_password, worker_password = "admin-s3cret", "worker-s3cret"
    server = RedisServer(tmp_path, password=admin_password).start()
    try:
        admin = Redis(port=server.port, password=admin_password)
        line = WORKER_ACL.replace("WORKER_PASSWORD", worker_password)
        await admin.execute_command(*shlex.split(line))  # type: ignore[no-untyped-call]
        local = {"model": QWEN, "timeout": 5.0, "api_base": cache_stub.url}
        env = worker_env(
            redis_url=f"redis://worker:{worker_password}@127.0.0.1:{server.port}/0",
            chains=json.dumps({"default": [local]}),
            poll_delay="0.05",
        )
        worker = WorkerProcess(env, tmp_path / "worker.log").start()
        tag = marker()
        try:
            admin_url = f"redis://default:{admin_password}@127.0.0.1:{server.port}/0"
            async with RouterClient(admin_url) as acl_client:
                results = [
                    await acl_client.route(f"say hi {tag}", cache_ttl=60, timeout=30)
                    for _ in range(2)
                ]
        finally:
            worker.stop()
        assert [r.cached for r in results] == [False, True]
        assert calls_with(cache_stub, tag) == 1
        refused = await admin.execute_command("ACL", "LOG")  # type: ignore[no-untyped-call]
        assert refused == [], refused
        assert "NOPERM" not in worker.log_text()
        await admin.aclose()
    finally:
        server.stop()
