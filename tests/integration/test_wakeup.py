"""The push path under contention: several producers, several workers, no job twice or lost."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator

import pytest
from redis.asyncio import Redis

from llm_router.client import RouterClient
from llm_router.client.keys import wake_key
from llm_router.client.protocol import RouteResult
from llm_router_testing.stubs import StubServer
from tests.integration.conftest import REDIS_URL, chain_env
from tests.integration.fleet import Fleet

pytestmark = pytest.mark.integration

WORKERS = 3
PRODUCERS = 4
JOBS_PER_PRODUCER = 75


@pytest.fixture(scope="module")
def fleet(
    redis_available: str, stub: StubServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    fleet = Fleet(
        tmp_path_factory.mktemp("fleet"),
        redis_available,
        chains=chain_env(stub.url),
        max_jobs="8",
        # A slow safety net, so that the wake-up path is what serves the jobs.
        poll_delay="5",
    )
    try:
        fleet.spawn(WORKERS)
        yield fleet
    finally:
        fleet.stop()


async def produce(queue: str, producer: int) -> list[tuple[str, RouteResult]]:
    async with RouterClient(REDIS_URL, queue_name=queue) as client:
        handles = []
        for n in range(JOBS_PER_PRODUCER):
            # A mix of instant answers, fallbacks and answers that take a while.
            directive = ("", "stub:qwen=refusal ", "stub:qwen=slow ")[n % 3]
            handles.append(await client.enqueue(f"{directive}p{producer} job {n}"))
            if n % 10 == 0:
                await asyncio.sleep(0.01)
        results = await asyncio.gather(
            *(h.result(timeout=60, raise_on_failure=False) for h in handles)
        )
        return [(h.job_id, r) for h, r in zip(handles, results, strict=True)]


async def test_every_job_gets_exactly_one_result(fleet: Fleet, redis: Redis) -> None:
    queue, workers = fleet.queue, fleet.workers
    batches = await asyncio.gather(*(produce(queue, p) for p in range(PRODUCERS)))
    pairs = [pair for batch in batches for pair in batch]
    assert len(pairs) == PRODUCERS * JOBS_PER_PRODUCER
    assert all(result.job_id == job_id for job_id, result in pairs)
    assert all(result.status == "ok" for _, result in pairs)
    await asyncio.sleep(0.3)  # let the last log lines reach the files

    # Each job was routed once, by exactly one worker.
    routed: Counter[str] = Counter()
    per_worker = []
    for worker in workers:
        ids = [r["job_id"] for r in worker.log_records() if r.get("event") == "routed"]
        routed.update(ids)
        per_worker.append(len(ids))
    job_ids = {job_id for job_id, _ in pairs}
    assert set(routed) >= job_ids
    assert [j for j in job_ids if routed[j] != 1] == []
    # The tokens reached idle workers: every worker took part.
    assert all(n > 0 for n in per_worker), per_worker
    assert await redis.zcard(queue) == 0
    assert all(w.alive for w in workers)
    # Tokens are consumed or capped, not piling up.
    assert await redis.llen(wake_key(queue)) <= 100  # type: ignore[misc]
