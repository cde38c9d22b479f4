"""Redis Sentinel: the worker and the producers follow a failover of the Redis primary.

A primary, a replica and a sentinel of our own, each on a free loopback port; one
worker process and two producers on the ``redis+sentinel://`` URL, enqueueing all the
time (the stub model answers at once). First a controlled ``SENTINEL FAILOVER``; once
the sentinel has turned the old primary into a replica of the new one, the new
primary is killed (SIGKILL) and the sentinel promotes the old one back; the killed
server then returns as a replica, as systemd would restart it.

One producer waits for a replica to confirm each enqueue (``wait_for_replicas=1``,
Redis ``WAIT``): none of its jobs may be lost. The other does not: replication is
asynchronous, so what it loses is counted and printed, not asserted.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

# Before llm_router.worker.jobs imports litellm: no price list from the internet.
import pytest
from pydantic import SecretStr
from redis import Redis as SyncRedis
from redis.exceptions import RedisError, ResponseError

from llm_router.client import RouterClient
from llm_router.client.connections import FollowingSentinelPool, redis_from_url
from llm_router.client.keys import result_key
from llm_router.worker.services import connect
from llm_router.worker.settings import Settings
from llm_router_testing.servers import (
    RedisServer,
    ReplicatedRedisServer,
    SentinelServer,
    make_tls_files,
)
from llm_router_testing.stubs import StubServer
from tests.integration.conftest import WorkerProcess, chain_env, worker_env

pytestmark = pytest.mark.integration

MASTER = "mymaster"
ENQUEUE_EVERY_S = 0.04
DRAIN_S = 6.0  # lease_seconds=2: a job whose result a primary took with it runs again


@dataclass
class Cluster:
    primary: ReplicatedRedisServer
    replica: ReplicatedRedisServer
    sentinel: SentinelServer

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel.port}/{MASTER}/0"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    started: list[ReplicatedRedisServer | SentinelServer] = []
    try:
        primary = ReplicatedRedisServer(tmp_path / "redis-a")
        started.append(primary)
        primary.start()
        replica = ReplicatedRedisServer(tmp_path / "redis-b", replica_of=primary.port)
        started.append(replica)
        replica.start()
        # 3 s, not 1: on a loaded machine a primary that stalls for a second would be
        # failed over once more, and the test's story would not be the one it tells.
        sentinel = SentinelServer(
            tmp_path / "sentinel", primary.port, master=MASTER, down_after_ms=3000
        )
        started.append(sentinel)
        sentinel.start()
        yield Cluster(primary, replica, sentinel)
    finally:
        for server in reversed(started):
            server.stop()


@dataclass
class Job:
    job_id: str
    enqueued: float  # when the enqueue returned (monotonic)
    done: float | None = None
    status: str | None = None


@dataclass
class Producer:
    name: str
    client: RouterClient
    jobs: list[Job] = field(default_factory=list)
    refused: int = 0
    slowest_enqueue_s: float = 0.0
    waits: list[asyncio.Task[None]] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        n = 0
        while not stop.is_set():
            started = time.monotonic()
            try:
                handle = await self.client.enqueue(f"{self.name} job {n}")
            except RedisError:
                self.refused += 1  # not acknowledged: not ours to find again
            else:
                job = Job(handle.job_id, time.monotonic())
                self.jobs.append(job)
                self.waits.append(asyncio.create_task(self._wait(job)))
            self.slowest_enqueue_s = max(self.slowest_enqueue_s, time.monotonic() - started)
            n += 1
            await asyncio.sleep(ENQUEUE_EVERY_S)

    async def _wait(self, job: Job) -> None:
        result = await self.client.wait(job.job_id, timeout=None)
        job.done, job.status = time.monotonic(), result.status

    def lost(self) -> list[Job]:
        return [j for j in self.jobs if j.done is None]


async def until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll a blocking ``check`` (errors count as no) until it holds; when it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if await asyncio.to_thread(check):
                return time.monotonic()
        except (RedisError, OSError):
            pass
        await asyncio.sleep(0.05)
    raise TimeoutError(f"not within {timeout}s: {what}")


def caught_up(replica: ReplicatedRedisServer, primary: ReplicatedRedisServer) -> bool:
    """The replica replicates the primary, its link is up and it has all it was sent."""
    info = replica.info()
    if info.get("role") != "slave" or info.get("master_port") != primary.port:
        return False
    if info.get("master_link_status") != "up":
        return False
    return int(info["slave_repl_offset"]) >= int(primary.info()["master_repl_offset"])


def sentinel_failover(sentinel: SentinelServer) -> None:
    """``SENTINEL FAILOVER``, retried while the sentinel has no replica it trusts yet."""
    deadline = time.monotonic() + 10
    while True:
        client = sentinel.client()
        try:
            client.execute_command("SENTINEL", "FAILOVER", MASTER)  # type: ignore[no-untyped-call]
            return
        except ResponseError as exc:
            if "NOGOODSLAVE" not in str(exc) or time.monotonic() > deadline:
                raise
        finally:
            client.close()
        time.sleep(0.2)


async def test_worker_and_producers_follow_failovers(
    cluster: Cluster, stub: StubServer, tmp_path: Path
) -> None:
    a, b, sentinel = cluster.primary, cluster.replica, cluster.sentinel
    queue = f"llm_router:test:sentinel:{uuid.uuid4().hex[:6]}"
    env = worker_env(
        redis_url=cluster.url,
        queue_name=queue,
        chains=chain_env(stub.url),
        max_jobs="20",
        poll_delay="0.2",
        lease_seconds="2",
    )
    worker = WorkerProcess(env, tmp_path / "worker.log").launch()
    events: dict[str, float] = {}
    try:
        await until(lambda: caught_up(b, a) and sentinel.good_replicas() >= 1, 15, "replica")
        worker.wait_ready()
        async with (
            RouterClient(cluster.url, queue_name=queue, reconnect_for=30) as plain_client,
            RouterClient(
                cluster.url, queue_name=queue, reconnect_for=30, wait_for_replicas=1
            ) as durable_client,
        ):
            plain = Producer("plain", plain_client)
            durable = Producer("durable", durable_client)
            stop = asyncio.Event()
            producing = [asyncio.create_task(p.run(stop)) for p in (plain, durable)]
            t0 = events["start"] = time.monotonic()
            try:
                await asyncio.sleep(2)
                # 1. A controlled failover: b is promoted, the sentinel later turns a
                #    (still running) into b's replica.
                events["failover"] = time.monotonic()
                await asyncio.to_thread(sentinel_failover, sentinel)
                b_address = ("127.0.0.1", b.port)
                events["failover_switch"] = await until(
                    lambda: sentinel.master_address() == b_address, 15, "b promoted"
                )
                events["a_rejoined"] = await until(lambda: caught_up(a, b), 25, "a replicates b")
                await asyncio.sleep(1)
                # 2. The new primary dies without a word; a is promoted back.
                events["kill"] = time.monotonic()
                b.kill()
                a_address = ("127.0.0.1", a.port)
                events["kill_switch"] = await until(
                    lambda: sentinel.master_address() == a_address, 20, "a promoted"
                )
                b.replica_of = a.port  # b comes back as a's replica
                await asyncio.to_thread(b.start)
                events["b_rejoined"] = await until(lambda: caught_up(b, a), 15, "b replicates a")
                await asyncio.sleep(2)
            finally:
                stop.set()
                await asyncio.gather(*producing)
                events["stop"] = time.monotonic()
            waits = plain.waits + durable.waits
            await asyncio.wait(waits, timeout=DRAIN_S)
            for task in waits:
                task.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        roles = {"a": a.role(), "b": b.role()}
        final_primary = sentinel.master_address()
        # Results of the jobs done since the kill are on the final primary, a.
        late = [j for p in (plain, durable) for j in p.jobs if (j.done or 0) > events["b_rejoined"]]
        direct = SyncRedis(port=a.port)
        try:
            stored = sum(bool(direct.exists(result_key(j.job_id))) for j in late)
        finally:
            direct.close()
        worker_alive = worker.alive
    finally:
        worker.stop()

    def summary(p: Producer) -> dict[str, object]:
        lost = p.lost()
        after = {k: events[k] for k in ("failover", "kill")}
        return {
            "enqueued": len(p.jobs),
            "results": sum(j.done is not None for j in p.jobs),
            "ok": sum(j.status == "ok" for j in p.jobs),
            "lost": len(lost),
            "lost_enqueued_s_after": {
                name: sorted(round(j.enqueued - t, 2) for j in lost if j.enqueued >= t)[:10]
                for name, t in after.items()
            },
            "refused": p.refused,
            "slowest_enqueue_s": round(p.slowest_enqueue_s, 2),
            "recover_s": {name: recover_s(p, events, name) for name in after},
        }

    report = {
        "failovers": 2,
        "timeline_s": {k: round(v - t0, 2) for k, v in sorted(events.items(), key=lambda i: i[1])},
        "plain": summary(plain),
        "durable": summary(durable),
        "late_results_on_final_primary": f"{stored}/{len(late)}",
        "roles_at_end": roles,
    }
    print(f"\nsentinel failover: {json.dumps(report, indent=1)}")

    assert worker_alive
    assert "Traceback" not in worker.log_text()
    assert final_primary == ("127.0.0.1", a.port)
    assert roles == {"a": "master", "b": "slave"}
    assert late
    assert stored == len(late)  # the worker wrote them to the new primary
    # The producer that waits for a replica loses nothing, whatever the failover.
    assert durable.refused == 0
    assert durable.lost() == []
    assert all(j.status == "ok" for j in durable.jobs)
    assert len(durable.jobs) > 50
    # The other one: counted above; nearly everything still comes back.
    assert len(plain.jobs) > 200
    assert sum(j.status == "ok" for j in plain.jobs) >= 0.9 * len(plain.jobs)


def recover_s(p: Producer, events: dict[str, float], name: str) -> float | None:
    """From the failover to the first result of a job enqueued after the switch."""
    switch = events[f"{name}_switch"]
    done = [j.done for j in p.jobs if j.done is not None and j.enqueued >= switch]
    return round(min(done) - events[name], 2) if done else None


async def test_tls_sentinel_with_passwords_for_sentinel_and_server(tmp_path: Path) -> None:
    """``rediss+sentinel://``: TLS to the sentinel and to the primary, each with its own
    password, for the client and for the worker's connection (arq's own cannot)."""
    tls = make_tls_files(tmp_path)
    (tmp_path / "redis").mkdir()
    server_password = "m@ster:pw/1"
    primary = RedisServer(tmp_path / "redis", password=server_password, tls=tls)
    sentinel = SentinelServer(
        tmp_path / "sentinel",
        primary.port,
        master=MASTER,
        password="sentinel-secret",
        master_password=server_password,
        tls=tls,
    )
    try:
        primary.start()
        sentinel.start()
        url = (
            f"rediss+sentinel://:{quote(server_password, safe='')}@127.0.0.1:{sentinel.port}"
            f"/{MASTER}/0?ssl_ca_certs={quote(str(tls['ca']), safe='')}"
            "&sentinel_password=sentinel-secret"
        )
        client = redis_from_url(url, socket_connect_timeout=5)
        try:
            assert await client.set("sentinel:tls", "yes")
            assert await client.get("sentinel:tls") == b"yes"
            pool_of_client = client.connection_pool
            assert isinstance(pool_of_client, FollowingSentinelPool)
            assert pool_of_client.master_address == ("127.0.0.1", primary.port)
        finally:
            await client.aclose()
        # The worker connects through the same URL parser as producers.
        pool = await connect(Settings(redis_url=SecretStr(url)))
        try:
            assert isinstance(pool.connection_pool, FollowingSentinelPool)
            assert await pool.get("sentinel:tls") == b"yes"
        finally:
            await pool.aclose()
        wrong = redis_from_url(url.replace("sentinel-secret", "wrong"), socket_connect_timeout=5)
        try:
            with pytest.raises(RedisError) as caught:
                await wrong.ping()
        finally:
            await wrong.aclose()
        for secret in (server_password, quote(server_password, safe=""), "sentinel-secret"):
            assert secret not in str(caught.value)
    finally:
        sentinel.stop()
        primary.stop()
