"""The batch lane's cloud leg through Message Batches: real Redis, real workers, and the
stub's batch routes (which answer each row as its real-time route would).

A backfill whose local model refuses every other row sends the cloud rows in a handful
of batches and makes no real-time cloud call; every row is written once; each cloud
row costs half what the same tokens cost in real time. Workers killed while jobs are
parked lose none and route none twice. An expired batch falls its jobs to the next
model; an interactive job on the same chain still calls in real time. A parked job
cancelled, or past its deadline, ends without waiting for its batch, even when no
worker heard the cancel.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import litellm
import pytest
from redis.asyncio import Redis

from llm_router.client import RouterClient
from llm_router.client.heartbeats import live_workers
from llm_router.client.keys import PARKED_KEY
from llm_router_testing.stubs import StubServer
from tests.integration.conftest import HAIKU, REDIS_URL, cloud_model, router_cli
from tests.integration.test_backfill import LOCAL, Lane, finish, local_model, output_rows

pytestmark = pytest.mark.integration

SONNET = "anthropic/claude-sonnet-4-6"
#: Rows whose local model refuses: the local stub says no, Haiku echoes the row's text.
TO_CLOUD = "stub:qwen=refusal stub:*=echo\n"
LOCALLY = "stub:*=echo\n"


@pytest.fixture
def server() -> Iterator[StubServer]:
    with StubServer(batch_seconds=1.0) as stub:
        yield stub


def batched(url: str, **fields: Any) -> dict[str, Any]:
    return {**cloud_model(url), "batch_api": True, **fields}


def chains(url: str, *tail: dict[str, Any]) -> dict[str, Any]:
    steps = [local_model(url), batched(url), *tail]
    return {"default": steps, "batch": steps}


FAST = {"batch_size": "400", "batch_wait": "1.0", "batch_poll": "0.5", "max_jobs": "40"}


def real_time_calls(stub: StubServer) -> list[Any]:
    return [r for r in stub.requests if r.path.rstrip("/") == "/v1/messages"]


def prices(model: str) -> dict[str, float]:
    """The model's real-time prices per token, from litellm's bundled map."""
    info: dict[str, Any] = dict(litellm.get_model_info(model))
    return {n: float(info[n]) for n in ("input_cost_per_token", "output_cost_per_token")}


async def heartbeats_parked(redis: Redis, lane: Lane) -> int:
    beats = [b for b in await live_workers(redis) if lane.batch_queue in b.queues]
    return sum((b.batches or {}).get("parked", 0) for b in beats)


async def parked_of(redis: Redis, ids: list[str]) -> int:
    return sum(s is not None for s in await redis.zmscore(PARKED_KEY, ids))


async def test_a_backfill_sends_its_cloud_rows_in_a_few_batches_at_half_the_price(
    server: StubServer, tmp_path: Path, redis: Redis
) -> None:
    rows = 2000
    lane = Lane(tmp_path, chains(server.url), **FAST)
    source, output = tmp_path / "input.jsonl", tmp_path / "output.jsonl"
    with source.open("w") as f:
        for n in range(1, rows + 1):
            prefix = TO_CLOUD if n % 2 else LOCALLY
            f.write(json.dumps({"id": f"row-{n}", "prompt": f"{prefix}answer for row {n}"}) + "\n")
    try:
        proc = lane.backfill(source, output, "--max-in-flight", str(rows))
        assert finish(proc, 240) == 0, (tmp_path / "backfill.log").read_text()[-3000:]
    finally:
        lane.stop()
        await lane.forget(redis)

    out = output_rows(output)
    assert sorted(Counter(r["id"] for r in out).values()) == [1] * rows
    cloud = [r for r in out if int(r["id"].split("-")[1]) % 2]
    local = [r for r in out if not int(r["id"].split("-")[1]) % 2]
    assert {r["model_used"] for r in local} == {LOCAL}
    assert {r["model_used"] for r in cloud} == {HAIKU}
    for row in cloud:
        assert row["status"] == "ok"
        assert row["content"] == f"answer for row {row['id'].split('-')[1]}"
        answered = row["attempts"][-1]
        assert answered["batch_id"].startswith("msgbatch_"), answered
    # No real-time cloud call; a handful of batches carried the 1,000 cloud rows.
    assert real_time_calls(server) == []
    assert server.batch_requests == {HAIKU.split("/", 1)[1]: rows // 2}
    sizes = [len(b.custom_ids) for b in server.batches]
    assert sum(sizes) == rows // 2
    assert 3 <= len(sizes) <= 12, sizes
    # Half the real-time price of the same tokens.
    live = prices(HAIKU)
    real_time = sum(
        r["attempts"][-1]["input_tokens"] * live["input_cost_per_token"]
        + r["attempts"][-1]["output_tokens"] * live["output_cost_per_token"]
        for r in cloud
    )
    paid = sum(r["attempts"][-1]["cost_usd"] for r in cloud)
    assert real_time > 0
    assert paid == pytest.approx(real_time / 2, rel=1e-6)
    assert sum(r["cost_usd"] for r in cloud) == pytest.approx(paid, rel=1e-6)
    print(f"\ncloud rows {len(cloud)}: real time ${real_time:.6f}, batch ${paid:.6f}, "
          f"batches {sizes}")  # fmt: skip


async def test_a_backfill_killed_while_its_rows_are_parked_finds_them_when_resumed(
    server: StubServer, tmp_path: Path, redis: Redis
) -> None:
    server.batch_seconds = 3.0
    rows = 200
    lane = Lane(tmp_path, chains(server.url), **FAST)
    source, output = tmp_path / "input.jsonl", tmp_path / "output.jsonl"
    with source.open("w") as f:
        for n in range(rows):
            f.write(json.dumps({"id": f"p{n}", "prompt": f"{TO_CLOUD}parked row {n}"}) + "\n")
    first = None
    try:
        before = await redis.zcard(PARKED_KEY)  # other tests' runs may have left some
        first = lane.backfill(source, output, "--max-in-flight", str(rows))
        deadline = time.monotonic() + 60
        while await redis.zcard(PARKED_KEY) - before < rows and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert await redis.zcard(PARKED_KEY) - before == rows
        first.kill()
        first.wait()
        second = lane.backfill(source, output, "--max-in-flight", str(rows))
        assert finish(second, 120) == 0, (tmp_path / "backfill.log").read_text()[-3000:]
    finally:
        if first is not None and first.poll() is None:  # a failed wait left it running
            first.kill()
            first.wait()
        lane.stop()
        await lane.forget(redis)
    out = output_rows(output)
    assert sorted(r["id"] for r in out) == sorted(f"p{n}" for n in range(rows))
    assert {r["model_used"] for r in out} == {HAIKU}
    # Each request went into a batch once: the second run found the rows still parked.
    assert server.batch_requests == {HAIKU.split("/", 1)[1]: rows}
    routed = Counter(lane.routed_job_ids())
    assert sorted(routed.values()) == [1] * rows


async def test_workers_killed_while_jobs_are_parked_lose_none_and_route_none_twice(
    server: StubServer, tmp_path: Path, redis: Redis
) -> None:
    server.batch_seconds = 4.0
    lane = Lane(tmp_path, chains(server.url), **FAST)
    jobs = 60
    ids = [f"parked-{uuid.uuid4().hex[:8]}-{n}" for n in range(jobs)]
    try:
        async with RouterClient(REDIS_URL, queue_name=lane.batch_queue) as client:
            handles = [
                await client.enqueue(f"{TO_CLOUD}parked {n}", job_id=job_id)
                for n, job_id in enumerate(ids)
            ]
            deadline = time.monotonic() + 30
            while await parked_of(redis, ids) < jobs and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert await parked_of(redis, ids) == jobs
            # Parked jobs hold no slot: nothing runs, and status says where they are.
            status = json.loads(
                router_cli("status", "--json", "--batch-queue", lane.batch_queue).stdout
            )
            assert status["queues"][lane.batch_queue]["parked"] == jobs
            assert status["queues"][lane.batch_queue]["running"] == 0
            deadline = time.monotonic() + 15  # the next heartbeats say so
            while await heartbeats_parked(redis, lane) < jobs and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert await heartbeats_parked(redis, lane) == jobs
            for worker in lane.workers:  # the whole fleet dies while its jobs are parked
                worker.kill()
            lane.workers = [lane.workers[0].__class__(w.env, w.log_path).start()
                            for w in lane.workers]  # fmt: skip
            results = await asyncio.gather(*(h.result(timeout=60) for h in handles))
    finally:
        lane.stop()
        await lane.forget(redis)
    assert [r.status for r in results] == ["ok"] * jobs
    assert {r.model_used for r in results} == {HAIKU}
    assert all(r.attempts[-1].batch_id for r in results)
    # Every request went into a batch once, and each job was routed to its end once.
    assert server.batch_requests == {HAIKU.split("/", 1)[1]: jobs}
    routed = Counter(lane.routed_job_ids())
    assert {i: routed[i] for i in ids} == dict.fromkeys(ids, 1)
    assert real_time_calls(server) == []


async def test_a_parked_job_can_be_cancelled_or_expire_without_waiting_for_its_batch(
    server: StubServer, tmp_path: Path, redis: Redis
) -> None:
    server.batch_seconds = 6.0
    settings = {**FAST, "batch_wait": "3.0"}
    lane = Lane(tmp_path, chains(server.url), **settings)
    try:
        async with RouterClient(REDIS_URL, queue_name=lane.batch_queue) as client:
            started = time.monotonic()
            expiring = await client.enqueue(f"{TO_CLOUD}expiring", expires_in=2.5)
            cancelled = await client.enqueue(f"{TO_CLOUD}cancelled")
            kept = await client.enqueue(f"{TO_CLOUD}kept")
            ids = [expiring.job_id, cancelled.job_id, kept.job_id]
            while await parked_of(redis, ids) < 3 and time.monotonic() - started < 10:
                await asyncio.sleep(0.05)
            assert await parked_of(redis, ids) == 3
            assert await client.cancel(cancelled.job_id)  # before its batch is sent
            asked = time.monotonic()
            stopped = await cancelled.result(timeout=10, raise_on_failure=False)
            cancel_s = time.monotonic() - asked
            gone = await expiring.result(timeout=10, raise_on_failure=False)
            expired_s = time.monotonic() - started
            answered = await kept.result(timeout=30)
            answered_s = time.monotonic() - started
    finally:
        lane.stop()
        await lane.forget(redis)
    assert stopped.status == "cancelled"
    assert cancel_s < (3.0 + server.batch_seconds) / 2  # far sooner than its batch's answer
    assert gone.status == "expired"
    assert expired_s < answered_s  # it did not wait for the batch's answer
    assert answered.status == "ok"
    assert answered.attempts[-1].batch_id is not None
    # The cancelled job's request was left out of the batch; the expiring one's may be in.
    sent = sum(server.batch_requests.values())
    assert 1 <= sent <= 2, server.batch_requests


async def test_a_cancel_published_while_no_worker_listened_still_stops_a_parked_job(
    server: StubServer, tmp_path: Path, redis: Redis
) -> None:
    server.batch_seconds = 30.0  # far longer than the cancel may take
    lane = Lane(tmp_path, chains(server.url), **{**FAST, "batch_wait": "0.5"})
    try:
        async with RouterClient(REDIS_URL, queue_name=lane.batch_queue) as client:
            handle = await client.enqueue(f"{TO_CLOUD}cancelled while down")
            deadline = time.monotonic() + 10
            while not server.batch_requests and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # parked, and its request sent in a batch
            assert server.batch_requests
            for worker in lane.workers:  # nobody hears the cancel
                worker.kill()
            assert await client.cancel(handle.job_id)
            lane.workers = [lane.workers[0].__class__(w.env, w.log_path).start()
                            for w in lane.workers]  # fmt: skip
            asked = time.monotonic()
            result = await handle.result(timeout=20, raise_on_failure=False)
            stopped_s = time.monotonic() - asked
    finally:
        lane.stop()
        await lane.forget(redis)
    assert result.status == "cancelled"
    assert stopped_s < server.batch_seconds / 2  # a started worker found the cancel
    assert real_time_calls(server) == []


async def test_an_expired_batch_falls_its_jobs_to_the_next_model(
    server: StubServer, tmp_path: Path, redis: Redis
) -> None:
    server.expire_batches = True
    sonnet = {**cloud_model(server.url), "model": SONNET}
    lane = Lane(tmp_path, chains(server.url, sonnet), **FAST)
    try:
        async with RouterClient(REDIS_URL, queue_name=lane.batch_queue) as client:
            handles = [await client.enqueue(f"{TO_CLOUD}expiring {n}") for n in range(5)]
            results = await asyncio.gather(*(h.result(timeout=60) for h in handles))
    finally:
        lane.stop()
        await lane.forget(redis)
    for result in results:
        assert result.status == "ok"
        assert result.model_used == SONNET
        haiku = result.attempts[1]
        assert (haiku.model, haiku.outcome) == (HAIKU, "rejected")
        assert (haiku.reason or "").startswith("BatchExpired"), haiku
        assert haiku.batch_id is not None
        assert haiku.cost_usd == 0
        assert result.attempts[2].batch_id is None  # Sonnet answered in real time
    assert [r.model for r in real_time_calls(server)] == [SONNET.split("/", 1)[1]] * 5


async def test_an_interactive_job_on_the_same_chain_calls_in_real_time(
    server: StubServer, tmp_path: Path, redis: Redis
) -> None:
    lane = Lane(tmp_path, chains(server.url), **FAST)
    try:
        async with RouterClient(REDIS_URL, queue_name=lane.queue) as client:
            result = await client.route(f"{TO_CLOUD}right now", timeout=30)
    finally:
        lane.stop()
        await lane.forget(redis)
    assert result.model_used == HAIKU
    assert result.attempts[-1].batch_id is None
    assert len(real_time_calls(server)) == 1
    assert server.batches == []
