"""Producers keep control of a job after enqueue: its deadline, and cancel.

Real worker processes on the real Redis, stub models on loopback. A deadline is kept
on Redis' clock (a key whose time to live it is), so a job not started in time ends
``expired`` with no model called, and a running one starts no further model; a cancel
keeps a queued job from running and stops a running one within about a second, its
model call abandoned and the model's slot and the budget's hold given back.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from llm_router.client import RouterClient
from llm_router.client.keys import cancel_key, deadline_key, holds_key, spend_key
from llm_router.client.protocol import RouteResult
from llm_router.client.spend import parse_day, utc_day
from llm_router_testing.stubs import StubServer
from tests.integration.conftest import REDIS_URL
from tests.integration.conftest import router_cli as cli
from tests.integration.fleet import Fleet

pytestmark = pytest.mark.integration

QWEN = "ollama_chat/qwen2.5:7b"
HAIKU = "anthropic/claude-haiku-4-5-20251001"
KEY = {"api_key": "sk-ant-test-secret-0123456789"}


@pytest.fixture(scope="module")
def stub() -> Iterator[StubServer]:
    with StubServer() as server:
        yield server


def chains(url: str) -> str:
    local = {"model": QWEN, "timeout": 2.0, "api_base": url, "max_in_flight": 1, "max_wait": 20}
    haiku = {"model": HAIKU, "timeout": 20.0, "api_base": url, **KEY}
    return json.dumps({"default": [local, haiku], "cloud": [haiku]})


@pytest.fixture
def fleet(tmp_path: Path, stub: StubServer) -> Iterator[Fleet]:
    budget = json.dumps({"cloud": 100.0})
    fleet = Fleet(tmp_path, REDIS_URL, chains=chains(stub.url), poll_delay="0.05", budgets=budget)
    yield fleet
    fleet.stop()


@pytest.fixture
async def client(fleet: Fleet) -> AsyncIterator[RouterClient]:
    async with RouterClient(REDIS_URL, queue_name=fleet.queue, fallback_poll=0.2) as c:
        yield c


def tag() -> str:
    return uuid.uuid4().hex[:12]


def calls_with(stub: StubServer, marker: str) -> list[str]:
    return [str(r.model) for r in stub.requests if marker in json.dumps(r.body)]


async def until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "never got there"
        await asyncio.sleep(0.02)


async def test_a_job_not_started_by_its_deadline_expires_without_a_model_call(
    fleet: Fleet, client: RouterClient, stub: StubServer, redis: Redis
) -> None:
    marker = tag()
    handle = await client.enqueue(f"too late {marker}", chain="cloud", expires_in=0.5)
    assert 0 < await redis.pttl(deadline_key(handle.job_id)) <= 500  # on Redis' clock
    await asyncio.sleep(0.8)  # no worker runs meanwhile
    fleet.spawn(1)
    result = await handle.result(timeout=30, raise_on_failure=False)
    assert result.status == "expired"
    assert result.error is not None
    assert result.error.startswith("expired: the job's deadline passed before a model")
    assert result.attempts == []
    assert calls_with(stub, marker) == []  # nothing called, so nothing paid
    day = parse_day(utc_day(), await redis.hgetall(spend_key(utc_day())))  # type: ignore[misc]
    cloud = day.chains.get("cloud")
    assert cloud is None or cloud.reserved_usd == 0
    holds = await redis.zrange(holds_key(utc_day()), 0, -1)
    assert not [h for h in holds if h.startswith(b"cloud|")]


async def test_a_job_within_its_deadline_is_answered(fleet: Fleet, client: RouterClient) -> None:
    fleet.spawn(1)
    result = await client.route(f"in time {tag()}", timeout=30)
    assert result.ok
    assert result.model_used == QWEN


async def test_a_running_job_past_its_deadline_starts_no_further_model(
    fleet: Fleet, client: RouterClient, stub: StubServer
) -> None:
    fleet.spawn(1)
    marker = tag()
    # The local model hangs to its 2 s deadline; the job's own ends after 1 s.
    handle = await client.enqueue(f"stub:qwen=hang {marker}", expires_in=1.0)
    result = await handle.result(timeout=30, raise_on_failure=False)
    assert result.status == "expired"
    assert [(a.model, a.outcome) for a in result.attempts] == [(QWEN, "rejected")]
    assert result.error == "expired: the job's deadline passed; no further model was started"
    assert calls_with(stub, marker) == ["qwen2.5:7b"]  # Haiku never called: no cloud spend


async def test_cancel_of_a_queued_job_keeps_it_from_running(
    fleet: Fleet, client: RouterClient, stub: StubServer, redis: Redis
) -> None:
    marker = tag()
    handle = await client.enqueue(f"never mind {marker}")
    assert await client.cancel(handle.job_id)
    assert await redis.exists(cancel_key(handle.job_id))
    fleet.spawn(1)
    result = await handle.result(timeout=30, raise_on_failure=False)
    assert result.status == "cancelled"
    assert result.attempts == []
    assert calls_with(stub, marker) == []
    assert not await client.cancel(handle.job_id)  # finished now: its result stays
    assert (await client.wait(handle.job_id, timeout=5)).status == "cancelled"


async def test_cancel_of_a_running_job_frees_the_local_slot_at_once(
    fleet: Fleet, client: RouterClient, stub: StubServer
) -> None:
    (worker,) = fleet.spawn(1)
    stub.set_behaviour("qwen", "hang")
    try:
        hanging = await client.enqueue(f"this call hangs {tag()}")
        await until(lambda: _hanging(stub))
        waiting = await client.enqueue(f"this one waits for the slot {tag()}")
        await asyncio.sleep(0.3)
        stub.reset_behaviours()
        cancelled_at = time.monotonic()
        assert await client.cancel(hanging.job_id)
        result = await hanging.result(timeout=10, raise_on_failure=False)
        stopped_s = time.monotonic() - cancelled_at
        after = await waiting.result(timeout=10)
        served_s = time.monotonic() - cancelled_at
    finally:
        stub.reset_behaviours()
    assert result.status == "cancelled"
    assert stopped_s < 1.0
    [attempt] = result.attempts
    assert (attempt.model, attempt.outcome) == (QWEN, "rejected")
    assert attempt.reason is not None
    assert attempt.reason.startswith("Cancelled: the call was abandoned")
    # The local model's one slot went to the next job at once, not after the 2 s timeout.
    assert after.model_used == QWEN
    assert served_s < 1.5
    assert [e["job_id"] for e in worker.events("job_cancelled")] == [hanging.job_id]


async def _hanging(stub: StubServer) -> bool:
    return any(r.behaviour is not None and r.behaviour.value == "hang" for r in stub.requests)


async def test_cancel_releases_the_budget_hold_of_a_running_cloud_call(
    fleet: Fleet, client: RouterClient, stub: StubServer, redis: Redis
) -> None:
    fleet.spawn(1)
    marker = tag()
    handle = await client.enqueue(f"stub:haiku=hang {marker}", chain="cloud")

    async def held() -> bool:
        holds = await redis.zrange(holds_key(utc_day()), 0, -1)
        return any(h.startswith(b"cloud|") for h in holds)

    await until(held)
    assert await client.cancel(handle.job_id)
    result = await handle.result(timeout=10, raise_on_failure=False)
    assert result.status == "cancelled"
    assert not await held()
    day = parse_day(utc_day(), await redis.hgetall(spend_key(utc_day())))  # type: ignore[misc]
    assert day.chains["cloud"].reserved_usd == 0


async def test_cancel_of_a_finished_or_unknown_job_is_false(
    fleet: Fleet, client: RouterClient
) -> None:
    fleet.spawn(1)
    result = await client.route(f"done {tag()}", timeout=30)
    assert result.job_id is not None
    assert not await client.cancel(result.job_id)
    assert not await client.cancel("no-such-job")
    assert (await client.wait(result.job_id, timeout=5)).ok  # kept its result


async def test_producer_mode_sets_the_deadline_on_redis_clock_too(
    fleet: Fleet, redis: Redis
) -> None:
    async with RouterClient(REDIS_URL, queue_name=fleet.queue, handover=False) as producer:
        handle = await producer.enqueue(f"plain commands {tag()}", expires_in=0.3)
        assert 0 < await redis.pttl(deadline_key(handle.job_id)) <= 300
        await asyncio.sleep(0.5)
        fleet.spawn(1)
        result: RouteResult = await handle.result(timeout=30, raise_on_failure=False)
    assert result.status == "expired"


async def test_the_cancel_command(fleet: Fleet, client: RouterClient) -> None:
    handle = await client.enqueue(f"cancelled from the shell {tag()}")
    run = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "llm_router.client.cli", "--redis-url", REDIS_URL,
         "--queue", fleet.queue, "cancel", handle.job_id, "no-such-job"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert run.returncode == 1  # one of the two was not queued or running
    assert f"{handle.job_id}: cancelled" in run.stdout
    assert "no-such-job: not queued or running" in run.stderr
    fleet.spawn(1)
    assert (await handle.result(timeout=30, raise_on_failure=False)).status == "cancelled"


async def test_backfill_rows_expire_only_when_asked(
    fleet: Fleet, tmp_path: Path, redis: Redis
) -> None:
    from llm_router.client.backfill import Backfill

    rows = tmp_path / "in.jsonl"
    rows.write_text(
        "".join(json.dumps({"id": n, "prompt": f"row {n} {tag()}"}) + "\n" for n in range(3))
    )
    batch = fleet.queue + ":batch"
    # No worker until well after the deadline: every row ends expired, none is lost.
    run = asyncio.ensure_future(
        Backfill(redis, rows, tmp_path / "out.jsonl", batch_queue=batch, expires_in=0.3).run()
    )
    await asyncio.sleep(0.8)
    fleet.spawn(1)
    summary = await asyncio.wait_for(run, 60)
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert summary.written == 3
    assert sorted(r["status"] for r in out) == ["expired"] * 3
    # Without --expires-in the same rows wait for the workers however long.
    plain = await Backfill(redis, rows, tmp_path / "plain.jsonl", batch_queue=batch).run()
    written = (tmp_path / "plain.jsonl").read_text().splitlines()
    assert plain.written == 3
    assert {json.loads(line)["status"] for line in written} == {"ok"}


async def test_an_expired_job_is_kept_for_the_failed_commands(
    fleet: Fleet, client: RouterClient, redis: Redis
) -> None:
    marker = tag()
    handle = await client.enqueue(f"expires unread {marker}", expires_in=0.5)
    await asyncio.sleep(0.8)
    fleet.spawn(1)
    assert (await handle.result(timeout=30, raise_on_failure=False)).status == "expired"
    listed = await asyncio.to_thread(cli, "failed", "list", "--json", "--limit", "1000")
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    [row] = [r for r in rows if r["job_id"] == handle.job_id]
    assert (row["status"], row["queue"]) == ("expired", fleet.queue)
    shown = await asyncio.to_thread(cli, "failed", "show", handle.job_id)
    assert shown.returncode == 0
    entry = json.loads(shown.stdout)
    assert marker in entry["request"]["messages"][0]["content"]
    assert entry["request"]["expires_in"] == 0.5
    # Requeued with a live worker: its deadline starts again, and this time it is met.
    requeued = await asyncio.to_thread(cli, "failed", "requeue", handle.job_id, "nope")
    assert requeued.returncode == 1
    assert f"{handle.job_id}: requeued" in requeued.stdout
    assert "nope: not requeued: not in the registry" in requeued.stderr
    assert (await client.wait(handle.job_id, timeout=30)).ok
    missing = await asyncio.to_thread(cli, "failed", "show", handle.job_id)
    assert missing.returncode == 1
