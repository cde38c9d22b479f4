"""Redis goes away and comes back (with AOF on, as production runs it): nothing is lost.

These tests run their own redis-server on its own port, never the shared one.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from llm_router.client import RouterClient, RouteResult
from llm_router_testing.servers import RedisServer
from llm_router_testing.stubs import StubServer
from tests.integration.conftest import WorkerProcess, chain_env, worker_env

pytestmark = pytest.mark.integration


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path, appendonly=True).start()
    yield server
    server.stop()


def url(server: RedisServer) -> str:
    return f"redis://127.0.0.1:{server.port}/0"


async def test_redis_restart_under_load_loses_nothing(
    private_redis: RedisServer, stub: StubServer, tmp_path: Path
) -> None:
    queue = f"llm_router:test:outage:{uuid.uuid4().hex[:6]}"
    env = worker_env(redis_url=url(private_redis), queue_name=queue, chains=chain_env(stub.url))
    workers = [WorkerProcess(env, tmp_path / f"w{n}.log").launch() for n in range(2)]
    for worker in workers:
        worker.wait_ready()
    jobs, restarts = 120, 2
    try:
        async with RouterClient(url(private_redis), queue_name=queue, reconnect_for=60) as client:

            async def produce(n: int) -> RouteResult:
                await asyncio.sleep(n * 0.05)  # spread over ~6 s, across the restarts
                prompt = ("stub:qwen=slow ", "", "stub:qwen=refusal ")[n % 3] + f"job {n}"
                handle = await client.enqueue(prompt)
                return await handle.result(timeout=120, raise_on_failure=False)

            async def restart_redis() -> None:
                for _ in range(restarts):
                    await asyncio.sleep(1.5)
                    private_redis.stop()  # SIGTERM: Redis flushes its AOF and exits
                    await asyncio.sleep(1.0)
                    await asyncio.to_thread(private_redis.start)

            restarter = asyncio.create_task(restart_redis())
            results = await asyncio.gather(*(produce(n) for n in range(jobs)))
            await restarter
        alive = [w.alive for w in workers]
    finally:
        for worker in workers:
            worker.stop()
    ok = sum(r.ok for r in results)
    print(f"\nredis restarts: {json.dumps({'jobs': jobs, 'restarts': restarts, 'results': ok})}")
    assert ok == jobs
    assert alive == [True, True]
    # Each worker said so once per outage, and that it was back.
    for worker in workers:
        assert worker.events("redis_unavailable")
        assert worker.events("redis_back")
        assert "Traceback" not in worker.log_text()


async def test_worker_started_before_redis_waits_for_it(tmp_path: Path, stub: StubServer) -> None:
    server = RedisServer(tmp_path, appendonly=True)  # not started yet
    queue = f"llm_router:test:late:{uuid.uuid4().hex[:6]}"
    env = worker_env(redis_url=url(server), queue_name=queue, chains=chain_env(stub.url))
    worker = WorkerProcess(env, tmp_path / "w.log").launch()
    try:
        deadline = time.monotonic() + 60
        while not worker.events("redis_unavailable") and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(2.0)
        assert worker.alive  # waiting, not crash-looping
        assert len(worker.events("redis_unavailable")) == 1  # one line, not one per try
        server.start()
        worker.wait_ready(60)
        async with RouterClient(url(server), queue_name=queue) as client:
            assert (await client.route("hello after the wait", timeout=30)).ok
    finally:
        worker.stop()
        server.stop()
