"""Producers outside the test process: the ``llm-router`` command and raw Redis writers."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from llm_router.client import RouterClient
from tests.integration.conftest import REDIS_URL, WorkerProcess
from tests.integration.test_routing import SCHEMA, enqueue_raw

pytestmark = pytest.mark.integration


def run_cli(*args: str, queue: str, redis_url: str = REDIS_URL) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_ROUTER_")}
    env.update(LLM_ROUTER_REDIS_URL=redis_url, LLM_ROUTER_QUEUE_NAME=queue)
    return subprocess.run(
        [sys.executable, "-m", "llm_router.client.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_routes_in_another_process(worker: WorkerProcess, queue_name: str) -> None:
    done = run_cli("route", "hello from a shell", "--context", "tests.cli", queue=queue_name)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "ok"
    assert result["model_used"] == "ollama_chat/qwen2.5:7b"
    assert result["context"] == "tests.cli"
    assert "hello from a shell" in result["content"]


def test_cli_schema_and_system(worker: WorkerProcess, queue_name: str, tmp_path: Path) -> None:
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    done = run_cli(
        "route", "stub:qwen=json answer", "--system", "be brief",
        "--schema", str(schema_file), queue=queue_name,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["content"] == {"answer": "qwen", "ok": True}


def test_cli_total_failure_exits_non_zero_with_attempt_log(
    worker: WorkerProcess, queue_name: str
) -> None:
    done = run_cli("route", "stub:*=refusal please", queue=queue_name)
    assert done.returncode == 1
    assert json.loads(done.stdout)["status"] == "failed"
    assert "failed: all 3 models" in done.stderr
    for model in ("qwen2.5:7b", "claude-haiku-4-5-20251001", "claude-sonnet-4-6"):
        assert model in done.stderr
    assert done.stderr.count("RefusalPattern matched") == 3


def test_cli_without_redis_prints_one_line(queue_name: str) -> None:
    done = run_cli("route", "hi", queue=queue_name, redis_url="redis://127.0.0.1:1/0")
    assert done.returncode == 3
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("llm-router: cannot reach Redis")
    assert "Traceback" not in done.stderr


def test_cli_rejects_an_invalid_schema_before_enqueueing(queue_name: str, tmp_path: Path) -> None:
    schema_file = tmp_path / "bad.json"
    schema_file.write_text('{"type": "objekt"}')
    done = run_cli("route", "hi", "--schema", str(schema_file), queue=queue_name)
    assert done.returncode == 2
    assert "invalid JSON Schema" in done.stderr


async def test_foreign_producer_with_plain_redis_commands(
    client: RouterClient, redis: Redis
) -> None:
    job_id = await enqueue_raw(
        redis, client.queue_name, {"messages": [{"role": "user", "content": "from Go, say"}]}
    )
    deadline = time.monotonic() + 20
    blob = None
    while blob is None and time.monotonic() < deadline:
        blob = await redis.get(f"arq:result:{job_id}")
        await asyncio.sleep(0.02)
    assert blob is not None
    data = json.loads(blob)  # plain JSON: any language can read it
    assert data["s"] is True
    assert data["a"] == []  # the prompt is not copied into the result
    assert data["r"]["status"] == "ok"
    assert data["r"]["job_id"] == job_id


PWNED = Path("/tmp/llm-router-pwned")


class Boom:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("touch /tmp/llm-router-pwned",))


MALFORMED: dict[str, bytes] = {
    "not json": b"this is not json at all",
    "pickle": pickle.dumps({"t": 1, "f": "route", "a": [Boom()], "k": {}, "et": 1}),
    "json list": b"[1, 2, 3]",
    "missing keys": json.dumps({"f": "route"}).encode(),
    "unknown function": json.dumps(
        {"t": 1, "f": "os.system", "a": [{"messages": []}], "k": {}, "et": 1}
    ).encode(),
    "request not an object": json.dumps(
        {"t": 1, "f": "route", "a": ["hello"], "k": {}, "et": 1}
    ).encode(),
    "no messages": json.dumps(
        {"t": 1, "f": "route", "a": [{"messages": []}], "k": {}, "et": 1}
    ).encode(),
    "kwargs not an object": json.dumps({"t": 1, "f": "route", "a": [], "k": [1], "et": 1}).encode(),
    "bad role": json.dumps(
        {
            "t": 1,
            "f": "route",
            "a": [{"messages": [{"role": "god", "content": "x"}]}],
            "k": {},
            "et": 1,
        }
    ).encode(),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
async def test_malformed_jobs_get_a_result_and_the_worker_survives(
    kind: str, client: RouterClient, redis: Redis, worker: WorkerProcess
) -> None:
    job_id = uuid.uuid4().hex
    now = int(time.time() * 1000)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(f"arq:job:{job_id}", MALFORMED[kind], px=60_000)
        pipe.zadd(client.queue_name, {job_id: now})
        await pipe.execute()
    result = await client.wait(job_id, timeout=20)
    assert result.status in {"invalid_request", "failed"}
    assert result.error
    if kind != "kwargs not an object":
        assert result.status == "invalid_request", result.error
    assert not PWNED.exists()
    assert worker.alive
    # ... and it still serves ordinary requests.
    assert (await client.route("still there?")).ok


def test_bad_setting_stops_the_worker_with_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_ROUTER_")}
    env["LLM_ROUTER_MAX_JOBS"] = "0"
    done = subprocess.run(
        [sys.executable, "-m", "llm_router.worker.cli"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "max_jobs" in lines[0]
