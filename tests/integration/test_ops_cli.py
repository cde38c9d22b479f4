"""``llm-router health``, ``status`` and ``metrics --follow``, and ``llm-router-worker --check``,
as commands against the real Redis: with it down, with no worker, with hand-written
heartbeats and with real worker processes (killed, busy, routing).

Every test has queues (and a metrics channel) of its own and deletes what it wrote.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from llm_router.client import RouterClient
from llm_router.client.heartbeats import HEARTBEAT_TTL_S, Heartbeat, live_workers
from llm_router.client.keys import WORKERS_KEY, heartbeat_key, job_key, result_key
from llm_router_testing.servers import RedisServer, free_port
from llm_router_testing.stubs import StubServer
from tests.integration.conftest import REDIS_URL, WorkerProcess, chain_env, worker_env

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "llm_router.client.cli"]
WORKER_CLI = [sys.executable, "-m", "llm_router.worker.cli"]
#: A job that stays running: the stub never answers, the local model's deadline is long.
HANG = "stub:qwen=hang"
HANG_TIMEOUT_S = 40.0


def unique(kind: str) -> str:
    return f"llm_router:test:ops:{kind}:{uuid.uuid4().hex[:8]}"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_ROUTER_")}
    env.update(extra)
    return env


async def run(
    argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or clean_env(COLUMNS="200"),
    )


async def cli(*args: str, url: str = REDIS_URL) -> subprocess.CompletedProcess[str]:
    return await run([*CLI, "--redis-url", url, *args])


class Keys:
    """What a test wrote into the shared Redis, deleted at the end."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.keys: set[str] = set()
        self.workers: set[str] = set()
        self.prefixes: set[str] = set()

    async def beat(self, worker_id: str, queues: list[str], **fields: Any) -> Heartbeat:
        """A heartbeat as a worker writes it: the JSON key with its TTL, and the index."""
        now = time.time()
        values: dict[str, Any] = {
            "worker_id": worker_id,
            "host": "test-host",
            "pid": 1,
            "version": "0.0.0",
            "started_at": now - 60,
            "at": now,
            "queues": queues,
            "max_jobs": 4,
            "batch_max_jobs": 1,
            **fields,
        }
        beat = Heartbeat.model_validate(values)
        self.workers.add(worker_id)
        self.keys.add(heartbeat_key(worker_id))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(heartbeat_key(worker_id), beat.model_dump_json(), ex=HEARTBEAT_TTL_S)
            pipe.zadd(WORKERS_KEY, {worker_id: int(now * 1000) + HEARTBEAT_TTL_S * 1000})
            await pipe.execute()
        return beat

    async def clean(self) -> None:
        keys = set(self.keys)
        for prefix in self.prefixes:
            keys.update([k.decode() async for k in self.redis.scan_iter(match=prefix + "*")])
        if keys:
            await self.redis.delete(*keys)
        if self.workers:
            await self.redis.zrem(WORKERS_KEY, *self.workers)


@pytest.fixture
async def keys(redis: Redis) -> AsyncIterator[Keys]:
    written = Keys(redis)
    yield written
    await written.clean()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    """Worker processes a test starts; SIGKILLed at the end (their hung jobs go with them)."""
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        if worker.alive:
            worker.kill()


def start_workers(
    started: list[WorkerProcess], directory: Path, n: int, **settings: str
) -> list[WorkerProcess]:
    env = worker_env(redis_url=REDIS_URL, poll_delay="0.05", **settings)
    new = [
        WorkerProcess(env, directory / f"worker-{len(started) + i}.log").launch() for i in range(n)
    ]
    started += new
    for worker in new:
        worker.wait_ready()
    return new


def forget(keys: Keys, queue: str, processes: list[WorkerProcess]) -> None:
    """Everything under the queue's name, and the heartbeats of its workers."""
    keys.prefixes.add(queue)
    for worker in processes:
        if worker.worker_id:
            keys.workers.add(worker.worker_id)
            keys.keys.add(heartbeat_key(worker.worker_id))


# --- health --------------------------------------------------------------------------------


async def test_health_with_redis_down_is_one_line_without_the_url() -> None:
    url = f"redis://:s3cret-pass@127.0.0.1:{free_port()}/0"  # a closed loopback port
    started = time.monotonic()
    done = await cli("health", url=url)
    assert time.monotonic() - started < 15
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "llm-router: unhealthy: Redis at the configured URL does not answer: ConnectionError"
    ]
    checked = await run([*WORKER_CLI, "--check"], env=clean_env(LLM_ROUTER_REDIS_URL=url))
    assert checked.returncode == 1
    assert checked.stdout.startswith("default: ")  # the settings were fine
    assert checked.stderr.splitlines() == [
        "llm-router-worker: unhealthy: Redis at the configured URL does not answer: ConnectionError"
    ]
    for output in (done.stderr, checked.stderr):
        assert "s3cret" not in output
        assert "127.0.0.1" not in output
    only_config = await run(
        [*WORKER_CLI, "--check-config"], env=clean_env(LLM_ROUTER_REDIS_URL=url)
    )
    assert only_config.returncode == 0, only_config.stderr


async def test_health_without_a_live_worker(redis_available: str, keys: Keys) -> None:
    queue = unique("q")
    done = await cli("--queue", queue, "health")
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith(f"llm-router: unhealthy: no live worker serves queue {queue!r} (")
    # Workers on other queues, and one on this queue that is stopping, do not count.
    await keys.beat(uuid.uuid4().hex, [unique("other")])
    await keys.beat(uuid.uuid4().hex, [queue], state="stopping")
    done = await run(
        [*CLI, "--redis-url", REDIS_URL, "health"], env=clean_env(LLM_ROUTER_QUEUE_NAME=queue)
    )
    assert done.returncode == 1
    assert "1 worker stopping" in done.stderr
    assert "serve other queues" in done.stderr or "serves other queues" in done.stderr


async def test_health_with_a_hand_written_heartbeat(redis: Redis, keys: Keys) -> None:
    queue = unique("q")
    worker_id = uuid.uuid4().hex
    await keys.beat(worker_id, [queue, queue + ":batch"], running={queue: 3})
    done = await cli("--queue", queue, "health")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"healthy: 1 worker serves {queue!r} (3 jobs running)"]
    assert done.stderr == ""
    # Its index entry lapsed (the key outlived it): not live.
    await redis.zadd(WORKERS_KEY, {worker_id: int(time.time() * 1000) - 1})
    done = await cli("--queue", queue, "health")
    assert done.returncode == 1


async def test_health_with_a_real_worker_and_its_heartbeat_gone_after_sigkill(
    redis: Redis, stub: StubServer, keys: Keys, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    queue = unique("q")
    [worker] = start_workers(workers, tmp_path, 1, queue_name=queue, chains=chain_env(stub.url))
    forget(keys, queue, [worker])
    worker_id = worker.worker_id
    assert worker_id is not None
    done = await cli("--queue", queue, "health")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"healthy: 1 worker serves {queue!r} (")
    checked = await run([*WORKER_CLI, "--check"], env=worker.env)
    assert checked.returncode == 0, checked.stderr
    lines = checked.stdout.splitlines()
    assert lines[0].startswith("default: ")
    assert lines[-1].startswith(f"healthy: 1 worker serves {queue!r} (")

    beat = Heartbeat.model_validate_json(await redis.get(heartbeat_key(worker_id)) or b"")
    assert worker.proc is not None
    assert beat.pid == worker.proc.pid
    assert beat.queues[0] == queue
    killed = time.monotonic()
    worker.kill()
    while await redis.exists(heartbeat_key(worker_id)):
        assert time.monotonic() - killed < HEARTBEAT_TTL_S + 2, "the heartbeat outlived its TTL"
        await asyncio.sleep(0.2)
    assert worker_id not in [b.worker_id for b in await live_workers(redis)]
    done = await cli("--queue", queue, "health")
    assert done.returncode == 1
    assert f"no live worker serves queue {queue!r}" in done.stderr


# --- status --------------------------------------------------------------------------------


async def status_json(queue: str, batch: str) -> dict[str, Any]:
    done = await cli("--queue", queue, "status", "--json", "--batch-queue", batch)
    assert done.returncode == 0, done.stderr
    data: dict[str, Any] = json.loads(done.stdout)
    return data


async def test_status_with_hand_written_heartbeats_and_pending_jobs(
    redis: Redis, keys: Keys
) -> None:
    queue, batch = unique("q"), unique("batch")
    keys.keys.update([queue, batch])
    await redis.zadd(queue, {f"job-{i}": i for i in range(5)})
    await redis.zadd(batch, {"b-1": 1})
    one = await keys.beat(uuid.uuid4().hex, [queue, batch], running={queue: 2})
    two = await keys.beat(uuid.uuid4().hex, [queue], running={queue: 1}, breakers={"m": "open"})
    data = await status_json(queue, batch)
    mine = [w for w in data["workers"] if queue in w["queues"]]
    assert {w["worker_id"] for w in mine} == {one.worker_id, two.worker_id}
    assert data["queues"] == {
        queue: {"depth": 5, "pending": 2, "running": 3, "parked": 0},
        batch: {"depth": 1, "pending": 1, "running": 0, "parked": 0},
    }
    assert data["breakers"]["m"]["state"] == "open"
    assert {"models", "spend_today", "in_flight"} <= set(data)
    text = await cli("--queue", queue, "status", "--batch-queue", batch)
    assert text.returncode == 0, text.stderr
    assert one.worker_id[:8] in text.stdout
    assert "Queues" in text.stdout
    assert queue in text.stdout


async def test_status_with_redis_down_exits_3() -> None:
    done = await cli("status", url=f"redis://127.0.0.1:{free_port()}/0")
    assert done.returncode == 3
    assert done.stderr.splitlines() == ["llm-router: cannot reach Redis: ConnectionError"]


async def test_status_reflects_two_busy_workers_and_pending_jobs(
    redis: Redis, stub: StubServer, keys: Keys, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """Two workers of 2 slots each, 6 jobs that hang: 4 running, 2 pending; and a queue no
    worker serves, where every job is pending.

    The jobs are queued before the workers start, so that the workers claim them from
    the queue: a job handed over at enqueue to a worker waiting with a free slot can,
    today, start beyond ``max_jobs`` when a claim fills that slot at the same moment.
    """
    queue, unserved = unique("q"), unique("unserved")
    keys.prefixes.add(unserved)
    keys.prefixes.add(queue)
    job_ids = []
    async with RouterClient(REDIS_URL, queue_name=queue) as client:
        for i in range(6):
            handle = await client.enqueue(f"{HANG} busy {i}", chain="local_only")
            job_ids.append(handle.job_id)
    async with RouterClient(REDIS_URL, queue_name=unserved) as client:
        for i in range(3):
            handle = await client.enqueue(f"nobody serves this {i}")
            job_ids.append(handle.job_id)
    keys.keys.update(k for j in job_ids for k in (job_key(j), result_key(j)))
    keys.keys.update(f"arq:{kind}:{j}" for j in job_ids for kind in ("in-progress", "retry"))
    before = await status_json(queue, unserved)
    assert before["queues"][queue] == {"depth": 6, "pending": 6, "running": 0, "parked": 0}
    busy = start_workers(
        workers,
        tmp_path,
        2,
        queue_name=queue,
        chains=chain_env(stub.url, local_timeout=HANG_TIMEOUT_S),
        max_jobs="2",
    )
    forget(keys, queue, busy)

    # Heartbeats are rewritten every TTL/3: wait for them to show the jobs running.
    deadline = time.monotonic() + HEARTBEAT_TTL_S + 10
    while True:
        data = await status_json(queue, unserved)
        if data["queues"][queue]["running"] == 4 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    mine = [w for w in data["workers"] if queue in w["queues"]]
    assert sorted(w["pid"] for w in mine) == sorted(w.proc.pid for w in busy if w.proc)
    assert all(w["state"] == "serving" for w in mine)
    assert [w["running"].get(queue) for w in mine] == [2, 2]
    assert all(w["max_jobs"] == 2 for w in mine)
    assert data["queues"][queue] == {"depth": 6, "pending": 2, "running": 4, "parked": 0}
    assert data["queues"][unserved] == {"depth": 3, "pending": 3, "running": 0, "parked": 0}
    assert data["in_flight"] >= 4
    text = await cli("--queue", queue, "status", "--batch-queue", unserved)
    assert text.returncode == 0, text.stderr
    for worker in mine:
        assert worker["worker_id"][:8] in text.stdout
        assert f"{worker['host']}:{worker['pid']}" in text.stdout
    assert "2/2" in text.stdout


# --- metrics --follow ----------------------------------------------------------------------


def follow(channel: str, url: str = REDIS_URL) -> subprocess.Popen[str]:
    """``metrics --follow`` with stdout a pipe: raw JSON lines."""
    return subprocess.Popen(
        [*CLI, "--redis-url", url, "metrics", "--follow", "--channel", channel],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )


async def subscribed(redis: Redis, channel: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while True:
        [(_, count)] = await redis.pubsub_numsub(channel)
        if count >= 1:
            return
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "metrics --follow never subscribed"
        await asyncio.sleep(0.05)


async def read_line(proc: subprocess.Popen[str], timeout: float = 30.0) -> str:
    assert proc.stdout is not None
    return await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout)


def interrupt(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """Ctrl-C: exit 130, and nothing on stderr."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err


async def test_metrics_follow_prints_each_event_raw_when_piped(redis: Redis) -> None:
    channel = unique("metrics")
    proc = follow(channel)
    try:
        await subscribed(redis, channel, proc)
        events = [{"job_id": "a", "status": "ok"}, {"job_id": "b", "status": "failed"}]
        for event in events:
            await redis.publish(channel, json.dumps(event))
        assert [json.loads(await read_line(proc)) for _ in events] == events
    finally:
        code, err = interrupt(proc)
    assert code == 130
    assert err == ""


async def test_metrics_follow_prints_the_event_of_a_job_routed_by_a_real_worker(
    redis: Redis, stub: StubServer, keys: Keys, workers: list[WorkerProcess], tmp_path: Path
) -> None:
    queue, channel = unique("q"), unique("metrics")
    [worker] = start_workers(
        workers, tmp_path, 1, queue_name=queue, chains=chain_env(stub.url), metrics_channel=channel
    )
    forget(keys, queue, [worker])
    proc = follow(channel)
    try:
        await subscribed(redis, channel, proc)
        async with RouterClient(REDIS_URL, queue_name=queue) as client:
            result = await client.route("stub:qwen=refusal followed", timeout=30)
        keys.keys.update([job_key(result.job_id or ""), result_key(result.job_id or "")])
        keys.keys.add(f"llm_router:metrics:counted:{result.job_id}")
        line = await read_line(proc)
    finally:
        code, err = interrupt(proc)
    event = json.loads(line)
    assert event["job_id"] == result.job_id
    assert event["status"] == "ok"
    assert event["model_used"] == result.model_used
    assert [a["outcome"] for a in event["attempts"]] == ["rejected", "success"]
    assert code == 130
    assert err == ""


async def test_metrics_follow_exits_3_when_redis_goes(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    url = f"redis://127.0.0.1:{server.port}/0"
    channel = unique("metrics")
    proc = follow(channel, url)
    private = Redis.from_url(url)
    try:
        await subscribed(private, channel, proc)
        await private.aclose()
        server.stop()
        _, err = await asyncio.to_thread(proc.communicate, timeout=30)
    finally:
        server.stop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 3
    assert err.splitlines() == ["llm-router: lost Redis: ConnectionError"]


async def test_metrics_counters_once(redis: Redis) -> None:
    done = await cli("metrics", "--json")
    assert done.returncode == 0, done.stderr
    models = json.loads(done.stdout)
    assert isinstance(models, dict)
    for counts in models.values():
        assert {"success", "fallback", "error", "skipped", "success_rate"} <= set(counts)
    table = await cli("metrics")
    assert table.returncode == 0, table.stderr
