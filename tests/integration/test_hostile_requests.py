"""The hostile catalogue (llm_router_testing.hostile) through a real worker, an innocent
job beside each.

Each hostile request is written straight into the queue, as a producer in any
language could; at the same moment an innocent request goes in through the
client. The hostile one must get its verdict (``invalid_request``, or every
attempt ``invalid`` with a reason), the innocent one an answer in normal time,
and the worker must keep renewing its leases. The client must refuse the
request-side ones before it enqueues anything. Run with ``-s`` to see the
innocent job's latency beside each entry and the worker's event-loop lag.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from redis.asyncio import Redis

from llm_router.client import RouterClient
from llm_router.client.keys import wake_key
from llm_router.client.protocol import RouteResult
from llm_router_testing.hostile import CATALOGUE, REQUEST_SIDE, Hostile
from llm_router_testing.stubs import StubServer
from tests.integration.conftest import REDIS_URL, WorkerProcess, chain_env, worker_env

pytestmark = pytest.mark.integration

LEASE_MS = 2000
#: The innocent job beside a hostile one must be answered within this (alone: ~20 ms).
INNOCENT_LIMIT_S = 1.0


class Fetches:
    """A server on loopback that counts the requests a schema could make the worker send."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        hits = self.hits

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits.append(self.path)
                body = b'{"type": "string"}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/schema.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Fetches:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def fetches() -> Iterator[Fetches]:
    with Fetches() as server:
        yield server


@pytest.fixture(scope="module")
def queue() -> str:
    return f"llm_router:test:hostile:{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def hostile_worker(
    redis_available: str, stub: StubServer, queue: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    env = worker_env(
        redis_url=redis_available,
        queue_name=queue,
        chains=chain_env(stub.url, local_timeout=5.0, cloud_timeout=5.0, roomy=True),
        max_jobs="10",
        poll_delay="0.05",
        lease_seconds=str(LEASE_MS / 1000),
    )
    log = tmp_path_factory.mktemp("hostile") / "worker.log"
    proc = WorkerProcess(env, log).start()
    yield proc
    proc.stop()


@pytest.fixture
async def client(hostile_worker: WorkerProcess, queue: str) -> AsyncIterator[RouterClient]:
    async with RouterClient(REDIS_URL, queue_name=queue, fallback_poll=0.1) as c:
        yield c


async def enqueue_raw(redis: Redis, queue: str, request_json: str) -> str:
    """What a producer in another language writes: arq's keys and a wake-up token."""
    job_id = uuid.uuid4().hex
    now = int(time.time() * 1000)
    blob = '{"t":1,"f":"route","a":[' + request_json + '],"k":{},"et":' + str(now) + "}"
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(f"arq:job:{job_id}", blob.encode(), px=120_000)
        pipe.zadd(queue, {job_id: now})
        pipe.lpush(wake_key(queue), "1")
        await pipe.execute()
    return job_id


async def lowest_lease(redis: Redis, job_id: str, done: asyncio.Event) -> int | None:
    """The lowest remaining lease time seen while the job runs (None: never seen)."""
    lowest: int | None = None
    while not done.is_set():
        ttl = await redis.pttl(f"arq:in-progress:{job_id}")
        if ttl > 0:
            lowest = ttl if lowest is None else min(lowest, ttl)
        await asyncio.sleep(0.02)
    return lowest


async def innocent_latency(client: RouterClient, marker: str) -> float:
    started = time.perf_counter()
    result = await client.route(f"innocent {marker}", timeout=30)
    assert result.ok
    return time.perf_counter() - started


@pytest.fixture(scope="module")
def baseline(hostile_worker: WorkerProcess, queue: str) -> float:
    async def measure() -> float:
        async with RouterClient(REDIS_URL, queue_name=queue) as c:
            return statistics.median([await innocent_latency(c, "alone") for _ in range(7)])

    return asyncio.run(measure())


def _name(entry: Hostile) -> str:
    return entry.name


@pytest.mark.parametrize("entry", CATALOGUE, ids=_name)
async def test_a_hostile_request_gets_its_verdict_and_the_worker_keeps_serving(
    entry: Hostile,
    client: RouterClient,
    redis: Redis,
    queue: str,
    stub: StubServer,
    fetches: Fetches,
    baseline: float,
) -> None:
    marker = uuid.uuid4().hex
    if entry.request_side and entry.client_refuses:
        payload = entry.payload(marker, fetches.url)
        queued = await redis.zcard(queue)
        with pytest.raises(ValueError) as refused:  # noqa: PT011 - the message is checked below
            await client.enqueue(
                payload["messages"], schema=payload.get("schema"), metadata=payload.get("metadata")
            )
        assert entry.refused is not None
        assert entry.refused in str(refused.value)
        assert await redis.zcard(queue) == queued  # nothing was enqueued

    job_id = await enqueue_raw(redis, queue, entry.wire_text(marker, fetches.url))
    done = asyncio.Event()
    lease_watch = asyncio.create_task(lowest_lease(redis, job_id, done))
    innocent = await innocent_latency(client, uuid.uuid4().hex)
    result: RouteResult = await client.wait(job_id, timeout=60)
    done.set()
    lowest = await lease_watch
    verdict = result.error or (result.attempts[0].reason if result.attempts else None) or ""
    print(
        f"\n{entry.name:42} innocent {innocent * 1000:6.1f} ms (alone {baseline * 1000:.1f} ms)"
        f"  lowest lease {lowest} ms  -> {result.status}: {verdict[:70]}"
    )
    assert innocent < INNOCENT_LIMIT_S
    if lowest is not None:  # renewed every third of the lease: a stalled loop lets it run low
        assert lowest > LEASE_MS // 2
    if entry.request_side:
        assert result.status == "invalid_request"
        assert result.attempts == []
        assert entry.refused is not None
        assert result.error is not None
        assert entry.refused in result.error
        assert not [r for r in stub.requests if marker in str(r.body)]  # no model was called
    else:
        assert result.status == "failed"
        assert [a.outcome for a in result.attempts] == ["invalid"] * 3  # the chain moved on
        assert entry.invalid is not None
        for attempt in result.attempts:
            assert attempt.reason is not None
            assert attempt.reason.startswith(entry.invalid), attempt.reason


def test_nothing_was_fetched_and_the_event_loop_never_stalled(
    hostile_worker: WorkerProcess, fetches: Fetches
) -> None:
    """Run last: the whole catalogue has been through this worker."""
    hostile_worker.stop()
    assert fetches.hits == []
    assert REQUEST_SIDE
    assert hostile_worker.events("job_crashed") == []
    assert hostile_worker.events("lease_lost") == []
    assert hostile_worker.events("event_loop_blocked") == []
    [lag] = hostile_worker.events("event_loop_lag")
    print(f"\nevent-loop lag over the catalogue: {lag}")
    assert lag["samples"] > 0
    assert lag["max_ms"] < 250
