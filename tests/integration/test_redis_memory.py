"""Redis keeps the data: a server that may evict, or that is full, is named everywhere
and loses nothing.

Each test starts its own redis-server on a loopback port (its settings are the point),
a real worker process on it and stub models. On ``allkeys-lru`` the worker warns,
``status`` says so and ``health`` fails naming the policy. At ``maxmemory``, with jobs
in flight, an enqueue is refused whole with :class:`RedisFull`, the worker keeps its
leases while it retries its stores, ``health`` and ``status`` say Redis is full, and
once memory is raised every job is answered exactly once.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from llm_router.client import RedisFull, RouterClient
from llm_router.client.keys import deadline_key, job_key, result_key
from llm_router.client.server import read_server
from llm_router_testing.servers import RedisServer
from llm_router_testing.stubs import StubServer
from tests.integration.conftest import WorkerProcess, router_cli, worker_env

pytestmark = pytest.mark.integration

QWEN = "ollama_chat/qwen2.5:7b"
LEASE_S = 2.0
SLOW_S = 1.5


@pytest.fixture(scope="module")
def stub() -> Iterator[StubServer]:
    with StubServer(slow_delay=SLOW_S) as server:
        yield server


@pytest.fixture
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    directory = tmp_path / "redis"
    directory.mkdir()
    config: list[str] = getattr(request, "param", [])
    redis_server = RedisServer(directory, config=config).start()
    yield redis_server
    redis_server.stop()


@pytest.fixture
async def redis(server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(url(server))
    yield client
    await client.aclose()


def url(server: RedisServer) -> str:
    return f"redis://127.0.0.1:{server.port}/0"


def start_worker(server: RedisServer, stub: StubServer, directory: Path) -> WorkerProcess:
    chains = {"default": [{"model": QWEN, "timeout": 20.0, "api_base": stub.url}]}
    env = worker_env(
        redis_url=url(server),
        queue_name="llm_router:queue",
        chains=json.dumps(chains),
        poll_delay="0.05",
        lease_seconds=str(LEASE_S),
        max_jobs="4",
    )
    return WorkerProcess(env, directory / "worker.log").start()


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "never got there"
        await asyncio.sleep(0.05)


async def test_what_is_read_of_the_server_and_what_needs_config(
    server: RedisServer, redis: Redis
) -> None:
    plain = await read_server(redis)
    assert plain.policy == "noeviction"
    assert plain.version == (await redis.info("server"))["redis_version"]
    assert plain.used_memory is not None
    assert plain.maxmemory == 0
    assert plain.persistent is None  # no AOF; save points need CONFIG, not asked for
    assert (await read_server(redis, config=True)).persistent is False  # save ""
    await redis.config_set("appendonly", "yes")
    try:
        assert (await read_server(redis)).persistent is True
    finally:
        await redis.config_set("appendonly", "no")  # a quick stop: no AOF to finish


@pytest.mark.parametrize("server", [["--maxmemory-policy", "allkeys-lru"]], indirect=True)
async def test_a_redis_that_may_evict_is_named_in_the_log_status_and_health(
    server: RedisServer, redis: Redis, stub: StubServer, tmp_path: Path
) -> None:
    worker = start_worker(server, stub, tmp_path)
    try:
        problems = [e["problem"] for e in worker.events("redis_unfit")]
        assert any("maxmemory-policy is allkeys-lru" in p for p in problems), problems

        health = await asyncio.to_thread(router_cli, "health", url=url(server))
        assert health.returncode == 1
        assert "allkeys-lru" in health.stderr
        assert "evict" in health.stderr

        status = await asyncio.to_thread(router_cli, "status", url=url(server))
        assert status.returncode == 0, status.stderr
        assert "maxmemory-policy allkeys-lru" in status.stdout
        assert "may evict queued jobs" in status.stdout
        as_json = await asyncio.to_thread(router_cli, "status", "--json", url=url(server))
        reported = json.loads(as_json.stdout)["redis"]
        assert reported["policy"] == "allkeys-lru"
        assert reported["problems"]

        # Put right: health passes at once, and the worker says so at its next look.
        await redis.config_set("maxmemory-policy", "noeviction")
        health = await asyncio.to_thread(router_cli, "health", url=url(server))
        assert health.returncode == 0, health.stderr

        async def said_fit() -> bool:
            return bool(worker.events("redis_fit_again"))

        await until(said_fit, timeout=10.0)
    finally:
        worker.stop()


async def test_a_full_redis_refuses_enqueues_keeps_leases_and_loses_nothing(
    server: RedisServer, redis: Redis, stub: StubServer, tmp_path: Path
) -> None:
    worker = start_worker(server, stub, tmp_path)
    token = worker.worker_id
    marker = uuid.uuid4().hex[:10]
    try:
        async with RouterClient(url(server), queue_name="llm_router:queue") as client:
            handles = [
                await client.enqueue(f"{marker}-{i} stub:qwen=slow", expires_in=300)
                for i in range(4)
            ]
            leases = [f"arq:in-progress:{h.job_id}" for h in handles]

            def answering(i: int) -> int:
                return sum(f"{marker}-{i} " in json.dumps(r.body) for r in stub.requests)

            async def all_answering() -> bool:  # every job in its model call
                return all(answering(i) for i in range(4))

            await until(all_answering)
            # A fifth waits for a slot (max_jobs 4): queued when Redis fills, run after.
            waiting = await client.enqueue(f"{marker}-4 stub:qwen=slow", expires_in=300)
            used = int((await redis.info("memory"))["used_memory"])
            await redis.config_set("maxmemory", used // 2)

            # Refused whole, in both enqueue modes: no job key, queue entry or deadline.
            async with RouterClient(
                url(server), queue_name="llm_router:queue", handover=False
            ) as plain:
                for producer, job_id in ((client, "refused-script"), (plain, "refused-plain")):
                    with pytest.raises(RedisFull, match="Redis is full"):
                        await producer.enqueue("never queued", job_id=job_id, expires_in=60)
                    assert await redis.exists(job_key(job_id), deadline_key(job_id)) == 0
                    assert await redis.zscore("llm_router:queue", job_id) is None

            health = await asyncio.to_thread(router_cli, "health", url=url(server))
            assert health.returncode == 1
            assert "Redis is full" in health.stderr
            status = await asyncio.to_thread(router_cli, "status", url=url(server))
            assert "Redis is full" in status.stdout

            # The answers come; their stores are refused, and retried under live leases.
            async def store_refused() -> bool:
                return bool(worker.events("redis_full"))

            await until(store_refused)
            watch_until = time.monotonic() + 3 * LEASE_S
            while time.monotonic() < watch_until:
                holders = await redis.mget(leases)
                assert holders == [token.encode() if token else None] * len(leases), holders
                assert await redis.exists(*(result_key(h.job_id) for h in handles)) == 0
                await asyncio.sleep(0.2)
            assert not worker.events("lease_lost")

            await redis.config_set("maxmemory", 0)
            results = [await h.result(timeout=30) for h in [*handles, waiting]]
            assert [r.status for r in results] == ["ok"] * 5
            for i in range(5):  # each model call made once: nothing ran twice
                assert answering(i) == 1, (i, answering(i))
            assert not worker.events("duplicate_run")
            assert worker.events("redis_room_again")

            # The refused job, enqueued again now, is answered.
            again = await client.enqueue(f"{marker}-again", job_id="refused-script")
            assert (await again.result(timeout=30)).ok
        health = await asyncio.to_thread(router_cli, "health", url=url(server))
        assert health.returncode == 0, health.stderr
    finally:
        worker.stop()
