"""``llm-router backfill`` against real Redis, real worker processes and stub models.

The backfill runs as the command a user types (a process of its own), so that
SIGINT and SIGKILL reach it the way they would from a terminal or the OOM killer.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from llm_router.client import RouterClient
from llm_router_testing.stubs import StubServer
from tests.integration.conftest import REDIS_URL, WorkerProcess, worker_env

pytestmark = pytest.mark.integration

LOCAL = "ollama_chat/qwen2.5:7b"
HAIKU = "anthropic/claude-haiku-4-5-20251001"


class Lane:
    """Two workers serving their own interactive and batch queues."""

    def __init__(self, directory: Path, chains: dict[str, Any], **settings: str) -> None:
        tag = uuid.uuid4().hex[:8]
        self.queue = f"llm_router:test:bf:{tag}"
        self.batch_queue = f"llm_router:test:bf:{tag}:batch"
        self.directory = directory
        env = worker_env(
            redis_url=REDIS_URL,
            queue_name=self.queue,
            batch_queue_name=self.batch_queue,
            chains=json.dumps(chains),
            **settings,
        )
        self.workers = [
            WorkerProcess(env, directory / f"worker-{n}.log").launch() for n in range(2)
        ]
        for worker in self.workers:
            worker.wait_ready()

    def backfill(self, source: Path, output: Path, *extra: str) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "llm_router.client.cli", "--redis-url", REDIS_URL]
        argv += ["backfill", str(source), "--output", str(output)]
        argv += ["--batch-queue", self.batch_queue, *extra]
        log = (self.directory / "backfill.log").open("ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_ROUTER_")}
        try:
            return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        finally:
            log.close()

    def routed_job_ids(self) -> list[str]:
        return [str(r["job_id"]) for w in self.workers for r in w.events("routed")]

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()

    async def forget(self, redis: Redis) -> None:
        """Delete what the run left in Redis: queued jobs, the queues, and the results
        no backfill collected (a run stopped by Ctrl-C leaves them for its rerun)."""
        for queue in (self.queue, self.batch_queue):
            ids = [i.decode() for i in await redis.zrange(queue, 0, -1)]
            for start in range(0, len(ids), 500):
                await redis.delete(*(f"arq:job:{i}" for i in ids[start : start + 500]))
            await redis.delete(queue, f"{queue}:wake", f"{queue}:idle")
        async for key in redis.scan_iter("arq:result:backfill:*", count=1000):
            blob = await redis.get(key)
            if blob is not None and json.loads(blob).get("q") == self.batch_queue:
                await redis.delete(key)


def output_rows(path: Path) -> list[dict[str, Any]]:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), "the output ends in a half line"
    return [json.loads(line) for line in data.splitlines()]


def wait_for_rows(path: Path, rows: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= rows:
            return
        if proc.poll() is not None:
            return
        time.sleep(0.05)
    raise TimeoutError(f"fewer than {rows} output rows within {timeout}s")


def finish(proc: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


@pytest.fixture
def echo_stub() -> Iterator[StubServer]:
    with StubServer() as server:
        server.set_behaviour("*", "echo")
        yield server


def local_model(url: str, **fields: Any) -> dict[str, Any]:
    return {"model": LOCAL, "timeout": 5.0, "api_base": url, "breaker_failures": 1000, **fields}


async def test_interrupted_by_sigint_and_sigkill_and_resumed_every_row_exactly_once(
    echo_stub: StubServer, tmp_path: Path, redis: Redis
) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    chains = {"default": [local_model(echo_stub.url)], "batch": [local_model(echo_stub.url)]}
    lane = Lane(tmp_path, chains, max_jobs="20")
    source, output = tmp_path / "input.jsonl", tmp_path / "output.jsonl"
    broken = {1234, 4321}  # line numbers of malformed lines
    with source.open("w") as f:
        for n in range(1, 5001):
            if n in broken:
                f.write('{"prompt": "a line cut short\n')
                continue
            row: dict[str, Any] = {"prompt": f"stub:*=echo\nanswer for row {n}"}
            if n % 2:
                row["id"] = f"row-{n}"  # the others get an id derived from the line
            f.write(json.dumps(row) + "\n")
    try:
        # 1. Ctrl-C part of the way through: a clean stop, whole lines, rows missing.
        first = lane.backfill(source, output, "--max-in-flight", "300")
        wait_for_rows(output, rng.randrange(300, 1500), first, timeout=120)
        first.send_signal(signal.SIGINT)
        assert finish(first, 60) == 130, (seed, (tmp_path / "backfill.log").read_text())
        after_sigint = len(output_rows(output))
        assert 0 < after_sigint < 5000
        # 2. Resumed, then SIGKILLed: no clean-up at all, and a torn last write.
        second = lane.backfill(source, output, "--max-in-flight", "300")
        wait_for_rows(output, rng.randrange(after_sigint + 300, 3800), second, timeout=120)
        second.kill()
        second.wait()
        with output.open("ab") as f:
            f.write(b'{"id": "row-torn", "sta')
        # 3. Resumed to the end.
        third = lane.backfill(source, output, "--max-in-flight", "300")
        assert finish(third, 240) == 0, (seed, (tmp_path / "backfill.log").read_text())
    finally:
        lane.stop()
        await lane.forget(redis)

    rows = output_rows(output)
    ids = Counter(r["id"] for r in rows)
    assert [i for i, n in ids.items() if n > 1] == [], f"rows written twice (seed {seed})"
    by_line = {r["line"]: r for r in rows}
    assert sorted(by_line) == list(range(1, 5001))
    for n, row in by_line.items():
        if n in broken:
            assert row["status"] == "invalid_request", row
            assert str(n) in row["error"]
            continue
        assert row["status"] == "ok", row
        assert row["content"] == f"answer for row {n}", (seed, row)
        assert row["model_used"] == LOCAL
        if n % 2:
            assert row["id"] == f"row-{n}"
    # Routed exactly once: no row was queued again after its result was written.
    routed = Counter(lane.routed_job_ids())
    assert [j for j, n in routed.items() if n > 1] == []
    assert len(routed) == 5000 - len(broken)


async def _interactive_latencies(client: RouterClient, n: int) -> list[tuple[float, str]]:
    out = []
    for i in range(n):
        started = time.monotonic()
        result = await client.route(f"interactive {i}", timeout=60)
        out.append((time.monotonic() - started, result.model_used))
    return out


async def test_interactive_requests_are_answered_locally_ahead_of_the_batch_work(
    tmp_path: Path, redis: Redis
) -> None:
    call_s = 0.1
    with StubServer(ollama_parallel=1, ollama_delay=call_s) as stub:
        local = local_model(stub.url, timeout=2.0, max_in_flight=1)
        cloud = {"model": HAIKU, "timeout": 5.0, "api_base": stub.url, "api_key": "sk-ant-x"}
        chains = {
            "default": [{**local, "max_wait": 5.0}, cloud],
            "batch": [{**local, "max_wait": 600.0}],  # local only: batch work waits its turn
        }
        lane = Lane(tmp_path, chains, max_jobs="10")
        source, output = tmp_path / "input.jsonl", tmp_path / "output.jsonl"
        source.write_text("".join(json.dumps({"prompt": f"row {n}"}) + "\n" for n in range(2000)))
        backfill = None
        try:
            async with RouterClient(REDIS_URL, queue_name=lane.queue) as client:
                idle = await _interactive_latencies(client, 8)
                backfill = lane.backfill(source, output)
                await asyncio.to_thread(wait_for_rows, output, 10, backfill, 60)
                # Each worker holds its batch share of jobs, all but one waiting for the model.
                waiting = await redis.zcard(f"llm_router:capacity:{LOCAL}@{stub.url}:line")
                busy = await _interactive_latencies(client, 8)
            batch_rows = len(output_rows(output))
        finally:
            if backfill is not None and backfill.poll() is None:
                backfill.send_signal(signal.SIGINT)
                finish(backfill, 60)
            lane.stop()
            await lane.forget(redis)
    idle_p50 = statistics.median(t for t, _ in idle)
    busy_p50 = statistics.median(t for t, _ in busy)
    print(
        f"interactive p50: idle {idle_p50 * 1000:.0f} ms, during the backfill "
        f"{busy_p50 * 1000:.0f} ms ({waiting} batch jobs in the model's line, "
        f"{batch_rows} rows done meanwhile)"
    )
    assert {m for _, m in idle + busy} == {LOCAL}, busy  # none pushed to the cloud
    assert waiting >= 8  # the batch lane really was queued up for the model
    # Behind the batch line it would wait ~waiting x call_s; ahead of it, one call at most.
    assert busy_p50 < idle_p50 + 4 * call_s, (idle, busy)
    assert busy_p50 < waiting * call_s / 2
    assert batch_rows >= 10
