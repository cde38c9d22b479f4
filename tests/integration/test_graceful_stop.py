"""SIGTERM: stop taking jobs, finish within the grace period, hand back the rest at once."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Iterator

import pytest
from redis.asyncio import Redis

from llm_router.client import RouterClient
from llm_router_testing.stubs import StubServer
from tests.integration.conftest import REDIS_URL, chain_env
from tests.integration.fleet import Fleet, wait_for_holder
from tests.integration.test_crash_recovery import wait_for_hits

pytestmark = pytest.mark.integration

SLOW_S = 3.0


@pytest.fixture(scope="module")
def stub3() -> Iterator[StubServer]:
    with StubServer(slow_delay=SLOW_S) as server:
        yield server


def make_fleet(tmp_path_factory: pytest.TempPathFactory, stub: StubServer, grace: float) -> Fleet:
    return Fleet(
        tmp_path_factory.mktemp("graceful"),
        REDIS_URL,
        chains=chain_env(stub.url, local_timeout=10),
        shutdown_grace=str(grace),
    )


async def test_sigterm_lets_the_running_job_finish(
    redis_available: str,
    stub3: StubServer,
    redis: Redis,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    fleet = make_fleet(tmp_path_factory, stub3, grace=20)
    (worker,) = fleet.spawn(1)
    tag = uuid.uuid4().hex
    try:
        async with RouterClient(REDIS_URL, queue_name=fleet.queue) as client:
            handle = await client.enqueue(f"stub:qwen=slow {tag}")
            await wait_for_holder(redis, handle.job_id)
            await wait_for_hits(stub3, tag, 1)
            stopped_at = time.monotonic()
            worker.signal(signal.SIGTERM)
            while not worker.events("worker_stopping"):
                await asyncio.sleep(0.02)
            # Enqueued once the worker is stopping: it must not take it.
            late = await client.enqueue(f"late {tag}")
            result = await handle.result(timeout=30)
            assert worker.proc is not None
            code = worker.proc.wait(30)
            stop_s = time.monotonic() - stopped_at
            assert result.ok
            assert [w.worker_id for w in fleet.routed(handle.job_id)] == [worker.worker_id]
            assert code == 0
            assert stop_s < SLOW_S + 5
            assert fleet.routed(late.job_id) == []
            assert await redis.zscore(fleet.queue, late.job_id) is not None
            # The next worker serves what the stopped one left.
            fleet.spawn(1)
            assert (await late.result(timeout=30)).ok
    finally:
        fleet.stop()


async def test_sigterm_hands_back_what_cannot_finish_in_time(
    redis_available: str,
    stub3: StubServer,
    redis: Redis,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    fleet = make_fleet(tmp_path_factory, stub3, grace=0.5)
    first, second = fleet.spawn(2)
    tag = uuid.uuid4().hex
    try:
        async with RouterClient(REDIS_URL, queue_name=fleet.queue) as client:
            handle = await client.enqueue(f"stub:qwen=slow {tag}")
            holder, _ = await wait_for_holder(redis, handle.job_id)
            await wait_for_hits(stub3, tag, 1)
            stopping = fleet.by_id(holder)
            other = second if stopping is first else first
            stopped_at = time.monotonic()
            stopping.signal(signal.SIGTERM)
            # Handed back: the other worker takes it at once, not after the 10 s lease.
            await wait_for_holder(redis, handle.job_id, other_than=holder, timeout=15)
            handover = time.monotonic() - stopped_at
            result = await handle.result(timeout=30)
            assert stopping.proc is not None
            assert stopping.proc.wait(30) == 0
    finally:
        fleet.stop()
    print(f"\nhand-over after SIGTERM (grace 0.5 s): {handover:.2f} s")
    assert handover < 3.0
    assert result.ok
    assert [w.worker_id for w in fleet.routed(handle.job_id)] == [other.worker_id]
    assert [r["job_id"] for r in stopping.events("job_handed_back")] == [handle.job_id]
