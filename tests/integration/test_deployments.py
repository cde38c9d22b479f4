"""One local step over several servers (``deployments``): stub Ollama servers that serve
one request at a time, real workers.

Two one-slot servers serve a burst in about half the time one does, each never more
than one call at a time; a server that refuses connections opens its own breaker and
the other serves every job, none going to the cloud; a weighted pair splits sequential
jobs close to its weights. Attempts name the server; heartbeats and /metrics show each.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from llm_router.client import RouterClient
from llm_router.client.heartbeats import live_workers
from llm_router_testing.servers import free_port
from llm_router_testing.stubs import StubServer
from tests.integration.conftest import REDIS_URL, WorkerProcess, cloud_model, worker_env

pytestmark = pytest.mark.integration

QWEN = "ollama_chat/qwen2.5:7b"
DELAY_S = 0.2
BURST = 20


def one_slot() -> StubServer:
    """An Ollama that generates one answer at a time, DELAY_S each (the rest queue)."""
    return StubServer(ollama_parallel=1, ollama_delay=DELAY_S)


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[StubServer, StubServer]]:
    with one_slot() as a, one_slot() as b:
        yield a, b


@pytest.fixture(scope="module")
def worker(
    servers: tuple[StubServer, StubServer],
    stub: StubServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[WorkerProcess]:
    a, b = servers
    haiku = cloud_model(stub.url)
    step: dict[str, Any] = {"model": QWEN, "timeout": 10.0, "max_wait": 30.0}
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    chains = {
        "default": [haiku],
        "two": [{**step, "deployments": [one_slot_at(a), one_slot_at(b)]}, haiku],
        "one": [{**step, "api_base": a.url, "max_in_flight": 1}, haiku],
        "half_dead": [
            {
                **step,
                "breaker_failures": 2,
                "deployments": [{"api_base": dead}, {"api_base": b.url, "max_in_flight": 1}],
            },
            haiku,
        ],
        "weighted": [
            {
                **step,
                "deployments": [
                    {"api_base": a.url, "weight": 3.0},
                    {"api_base": b.url, "weight": 1.0},
                ],
            },
            haiku,
        ],
    }
    metrics_port = free_port()
    env = worker_env(
        redis_url=REDIS_URL,
        queue_name=f"llm_router:test:deploy:{uuid.uuid4().hex[:6]}",
        chains=json.dumps(chains),
        max_jobs=str(BURST + 5),
        poll_delay="0.05",
        metrics_port=str(metrics_port),
    )
    env["TEST_METRICS_PORT"] = str(metrics_port)
    proc = WorkerProcess(env, tmp_path_factory.mktemp("deploy") / "worker.log").start()
    yield proc
    proc.stop()


def one_slot_at(server: StubServer) -> dict[str, Any]:
    return {"api_base": server.url, "max_in_flight": 1}


@pytest.fixture
async def client(worker: WorkerProcess) -> AsyncIterator[RouterClient]:
    async with RouterClient(REDIS_URL, queue_name=worker.env["LLM_ROUTER_QUEUE_NAME"]) as c:
        yield c


async def burst(client: RouterClient, chain: str) -> tuple[float, list[Any]]:
    started = time.monotonic()
    handles = [
        await client.enqueue(f"burst {n} {uuid.uuid4().hex}", chain=chain) for n in range(BURST)
    ]
    results = await asyncio.gather(*(h.result(timeout=60) for h in handles))
    return time.monotonic() - started, results


async def test_two_one_slot_servers_serve_a_burst_in_half_the_time(
    client: RouterClient, servers: tuple[StubServer, StubServer]
) -> None:
    a, b = servers
    for server in servers:
        server.reset_counters()
        server.reset_peak()
    one_s, alone = await burst(client, "one")  # the same run: one server for reference
    assert a.peak_generating == 1
    for server in servers:
        server.reset_counters()
        server.reset_peak()
    two_s, both = await burst(client, "two")
    assert all(r.model_used == QWEN for r in [*alone, *both])  # all local, none cloud
    used = Counter(r.attempts[0].deployment for r in both)
    assert set(used) == {a.url, b.url}
    assert a.peak_generating == 1
    assert b.peak_generating == 1  # never more than its one slot
    assert two_s < one_s * 0.75, (one_s, two_s)
    print(f"\n{BURST} jobs: one server {one_s:.2f}s, two {two_s:.2f}s, split {dict(used)}")


async def test_a_server_refusing_connections_opens_its_breaker_and_the_other_serves(
    client: RouterClient, worker: WorkerProcess, servers: tuple[StubServer, StubServer]
) -> None:
    results = [
        await client.route(f"half dead {n}", chain="half_dead", timeout=30) for n in range(8)
    ]
    assert [r.model_used for r in results] == [QWEN] * 8  # none went to the cloud
    assert {r.attempts[0].deployment for r in results} == {servers[1].url}
    opened = [e for e in worker.events("breaker_open") if "127.0.0.1" in e["model"]]
    assert opened, "the dead server's breaker never opened"
    assert servers[1].url not in json.dumps(opened)
    assert worker.events("deployment_failover")


async def test_a_weighted_pair_splits_close_to_its_weights(
    client: RouterClient, servers: tuple[StubServer, StubServer]
) -> None:
    results = [await client.route(f"weighted {n}", chain="weighted", timeout=30) for n in range(60)]
    used = Counter(r.attempts[0].deployment for r in results)
    heavy = used[servers[0].url]
    # Binomial(60, 3/4): mean 45, sd 3.4; 33..55 is beyond 3.5 sd either way.
    assert 33 <= heavy <= 55, used


async def test_heartbeats_and_metrics_show_each_deployment(
    client: RouterClient, worker: WorkerProcess, redis: Any, servers: tuple[StubServer, StubServer]
) -> None:
    await client.route("show me", chain="two", timeout=30)
    await asyncio.sleep(5.5)  # a heartbeat
    (beat,) = [b for b in await live_workers(redis) if b.worker_id == worker.worker_id]
    assert f"{QWEN}@{servers[0].url}" in beat.breakers
    assert f"{QWEN}@{servers[1].url}" in beat.breakers
    port = worker.env["TEST_METRICS_PORT"]
    page = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    )
    text = page.decode()
    assert f'deployment="{servers[0].url}"' in text
    assert "llm_router_deployment_in_flight" in text
