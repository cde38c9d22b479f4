"""Workers die mid-job (SIGKILL), stall past their lease (SIGSTOP), or a job kills them."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from redis.asyncio import Redis

from llm_router.client import RouterClient
from llm_router.client.failed import FailedJobs
from llm_router.client.keys import METRICS_CHANNEL, METRICS_COUNTERS_KEY
from llm_router_testing.stubs import StubServer
from tests.integration.conftest import REDIS_URL, chain_env
from tests.integration.fleet import Fleet, wait_for_holder

pytestmark = pytest.mark.integration

SLOW_S = 2.0
QWEN_SUCCESS = "ollama_chat/qwen2.5:7b|success"


@pytest.fixture(scope="module")
def slow_stub() -> Iterator[StubServer]:
    with StubServer(slow_delay=SLOW_S) as server:
        yield server


@pytest.fixture(scope="module")
def default_fleet(
    redis_available: str, slow_stub: StubServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    """Two workers with the production lease (10 s)."""
    fleet = Fleet(
        tmp_path_factory.mktemp("default-fleet"),
        redis_available,
        chains=chain_env(slow_stub.url, local_timeout=10),
    )
    fleet.spawn(2)
    yield fleet
    fleet.stop()


def _three_quick_workers(
    factory: pytest.TempPathFactory, redis_url: str, stub: StubServer, name: str, **extra: str
) -> Fleet:
    fleet = Fleet(
        factory.mktemp(name),
        redis_url,
        chains=chain_env(stub.url, local_timeout=10),
        lease_seconds="3",
        max_jobs="4",
        **extra,
    )
    fleet.spawn(3)
    return fleet


@pytest.fixture(scope="module")
def chaos_fleet(
    redis_available: str, slow_stub: StubServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    """Three workers with a 3 s lease and more starts than the chaos has kills: with
    max_tries 3, six random kills may legitimately make a job poison (three of its
    workers killed under it), which is another test's subject."""
    fleet = _three_quick_workers(
        tmp_path_factory, redis_available, slow_stub, "chaos-fleet", max_tries="10"
    )
    yield fleet
    fleet.stop()


@pytest.fixture(scope="module")
def quick_fleet(
    redis_available: str, slow_stub: StubServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    """Three workers with a 3 s lease, so that many take-overs fit in a test."""
    fleet = _three_quick_workers(tmp_path_factory, redis_available, slow_stub, "quick-fleet")
    yield fleet
    fleet.stop()


def stub_hits(stub: StubServer, tag: str) -> int:
    return sum(tag in json.dumps(r.body) for r in stub.requests if r.path == "/api/chat")


async def wait_for_hits(stub: StubServer, tag: str, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while stub_hits(stub, tag) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the stub saw {stub_hits(stub, tag)} of {n} calls for {tag}")
        await asyncio.sleep(0.02)


async def test_killed_workers_job_is_taken_over_within_15_s(
    default_fleet: Fleet, slow_stub: StubServer, redis: Redis
) -> None:
    tag = uuid.uuid4().hex
    async with RouterClient(REDIS_URL, queue_name=default_fleet.queue) as client:
        handle = await client.enqueue(f"stub:qwen=slow {tag}")
        holder, _ = await wait_for_holder(redis, handle.job_id)
        await wait_for_hits(slow_stub, tag, 1)
        victim = default_fleet.by_id(holder)
        killed_at = time.monotonic()
        victim.kill()
        new_holder, _ = await wait_for_holder(redis, handle.job_id, other_than=holder)
        recovery = time.monotonic() - killed_at
        result = await handle.result(timeout=30)
    print(f"\nrecovery after SIGKILL with the default 10 s lease: {recovery:.2f} s")
    assert recovery <= 15.0
    assert result.ok
    assert [w.worker_id for w in default_fleet.routed(handle.job_id)] == [new_holder]
    default_fleet.spawn(1)


async def test_random_kills_lose_nothing_and_count_nothing_twice(
    chaos_fleet: Fleet, slow_stub: StubServer, redis: Redis
) -> None:
    quick_fleet = chaos_fleet
    rng = random.Random(20261126)
    jobs = 60
    events: Counter[str] = Counter()
    before = int(await redis.hget(METRICS_COUNTERS_KEY, QWEN_SUCCESS) or 0)  # type: ignore[misc]
    pubsub = redis.pubsub()
    await pubsub.subscribe(METRICS_CHANNEL)

    async def listen() -> None:
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None:
                events[json.loads(message["data"])["job_id"]] += 1

    kills: list[float] = []

    async def chaos() -> None:
        # Bounded: at most 6 kills, each followed by a replacement worker.
        for _ in range(6):
            await asyncio.sleep(rng.uniform(1.0, 3.0))
            alive = quick_fleet.alive
            if len(alive) < 2:
                continue
            rng.choice(alive).kill()
            kills.append(time.monotonic())
            quick_fleet.spawn(1, wait=False)

    listener = asyncio.create_task(listen())
    try:
        async with RouterClient(REDIS_URL, queue_name=quick_fleet.queue) as client:
            tags = [uuid.uuid4().hex for _ in range(jobs)]
            handles = []
            for n, tag in enumerate(tags):
                prompt = f"stub:qwen=slow {tag}" if n % 2 else f"instant {tag}"
                handles.append(await client.enqueue(prompt))
            killer = asyncio.create_task(chaos())
            results = await asyncio.gather(
                *(h.result(timeout=240, raise_on_failure=False) for h in handles)
            )
            await killer
        # A worker killed between storing a result and counting it leaves the job
        # pending; a live worker's sweep counts and announces it within seconds.
        ids = [h.job_id for h in handles]
        deadline = time.monotonic() + 40
        while [i for i in ids if events[i] != 1] and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # and nothing is announced twice after that
    finally:
        listener.cancel()
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    after = int(await redis.hget(METRICS_COUNTERS_KEY, QWEN_SUCCESS) or 0)  # type: ignore[misc]
    started_twice = sum(stub_hits(slow_stub, tag) > 1 for tag in tags)
    ids = [h.job_id for h in handles]
    summary: dict[str, Any] = {
        "jobs": jobs,
        "kills": len(kills),
        "results": sum(r.ok for r in results),
        "lost": jobs - sum(r.ok for r in results),
        "started_more_than_once": started_twice,
        "events": sum(events[i] for i in ids),
        "counted": after - before,
    }
    print("\nrandom kills:", json.dumps(summary))
    assert len(kills) >= 3
    assert summary["lost"] == 0
    assert all(r.job_id == h.job_id for r, h in zip(results, handles, strict=True))
    # Each job counted and announced once, however often it was started.
    assert summary["counted"] == jobs
    assert [i for i in ids if events[i] != 1] == []
    # Routed once, or again only after a worker was killed between routing the job and
    # storing its result (its lease then lapses): never twice by workers that lived.
    for job_id in ids:
        routers = quick_fleet.routed(job_id)
        assert routers, job_id
        assert sum(w.alive for w in routers) <= 1, (job_id, [w.log_path for w in routers])
    for worker in quick_fleet.workers:
        if worker.alive:
            worker.wait_ready()


async def test_stalled_worker_runs_the_job_twice_but_leaves_one_result(
    quick_fleet: Fleet, slow_stub: StubServer, redis: Redis
) -> None:
    tag = uuid.uuid4().hex
    before = int(await redis.hget(METRICS_COUNTERS_KEY, QWEN_SUCCESS) or 0)  # type: ignore[misc]
    pubsub = redis.pubsub()
    await pubsub.subscribe(METRICS_CHANNEL)
    async with RouterClient(REDIS_URL, queue_name=quick_fleet.queue) as client:
        handle = await client.enqueue(f"stub:qwen=slow {tag}")
        await wait_for_hits(slow_stub, tag, 1)
        # The worker calling the model now (a job handed at enqueue to a worker that has
        # just been killed is leased to that dead worker first, until its lease lapses).
        holder, _ = await wait_for_holder(redis, handle.job_id)
        stalled = quick_fleet.by_id(holder)
        stalled.signal(signal.SIGSTOP)  # alive, but past its lease: "only slow"
        try:
            await wait_for_holder(redis, handle.job_id, other_than=holder)
            result = await handle.result(timeout=30)
        finally:
            stalled.signal(signal.SIGCONT)
        # The stalled worker now finishes its own run of the same job.
        deadline = time.monotonic() + 20
        while not stalled.events("duplicate_run") and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        stored = await redis.get(f"arq:result:{handle.job_id}")
        leftover = await redis.llen(client.inbox.key)  # type: ignore[misc]
    events = []
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        m = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
        if m is not None:
            events.append(json.loads(m["data"]))
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    after = int(await redis.hget(METRICS_COUNTERS_KEY, QWEN_SUCCESS) or 0)  # type: ignore[misc]
    assert result.ok
    assert stub_hits(slow_stub, tag) == 2  # it really ran twice
    assert [r["job_id"] for r in stalled.events("duplicate_run")] == [handle.job_id]
    assert stored is not None
    assert json.loads(stored)["r"]["job_id"] == handle.job_id
    assert leftover == 0  # no second reply pushed
    assert after - before == 1  # counted once
    assert [e["job_id"] for e in events].count(handle.job_id) == 1  # announced once


async def test_a_job_that_kills_its_workers_stops_after_max_tries(
    quick_fleet: Fleet, slow_stub: StubServer, redis: Redis
) -> None:
    quick_fleet.spawn(max(0, 4 - len(quick_fleet.alive)))
    tag = uuid.uuid4().hex
    async with RouterClient(REDIS_URL, queue_name=quick_fleet.queue) as client:
        handle = await client.enqueue(f"stub:qwen=slow poison {tag}")
        killed: set[str] = set()
        last: str | None = None
        for n in range(1, 4):  # max_tries = 3: every start kills its worker
            holder, _ = await wait_for_holder(redis, handle.job_id, other_than=last, timeout=30)
            await wait_for_hits(slow_stub, tag, n)
            quick_fleet.by_id(holder).kill()
            killed.add(holder)
            last = holder
        result = await handle.result(timeout=60, raise_on_failure=False)
    assert len(killed) == 3
    assert result.status == "failed"
    assert result.error is not None
    assert "not tried again" in result.error
    assert stub_hits(slow_stub, tag) == 3  # the fourth start never called a model
    # Kept in the failed-job registry with its request, and run exactly once more on
    # request.
    registry = FailedJobs(redis)
    entry = await registry.show(handle.job_id)
    assert entry is not None
    assert entry.result.status == "failed"
    assert entry.request is not None
    assert tag in json.dumps(entry.request)
    assert entry.queue == quick_fleet.queue
    quick_fleet.spawn(max(0, 2 - len(quick_fleet.alive)))
    assert await registry.requeue(handle.job_id) is None
    assert await registry.show(handle.job_id) is None  # out of the registry
    assert await registry.requeue(handle.job_id) == "not in the registry"
    async with RouterClient(REDIS_URL, queue_name=quick_fleet.queue) as client:
        again = await client.wait(handle.job_id, timeout=60)
    assert again.ok
    await asyncio.sleep(1.0)
    assert stub_hits(slow_stub, tag) == 4  # once more, and only once
