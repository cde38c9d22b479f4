"""Redis ACLs: a producer user kept out of the workers' keys, a worker user that runs.

A private redis-server (default user off) with the two ``ACL SETUSER`` lines of
docs/protocol.md, "Redis ACLs"; the default queue names, so the lines are the documented
ones. The producer enqueues in producer mode (``handover=False``) and gets its result
from a real worker logged in as ``worker``; everything the hand-over script would write
is refused to it with ``NOPERM``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.exceptions import NoPermissionError

from llm_router.client import RouterClient
from llm_router.client.lua import script
from llm_router_testing.servers import RedisServer, free_port
from llm_router_testing.stubs import StubServer
from tests.integration.conftest import WorkerProcess, chain_env, worker_env

pytestmark = pytest.mark.integration

ADMIN_PASSWORD = "admin-s3cret"
PRODUCER_PASSWORD = "producer-s3cret"
WORKER_PASSWORD = "worker-s3cret"

#: As in docs/protocol.md, "Redis ACLs" (there with PRODUCER_PASSWORD / WORKER_PASSWORD).
PRODUCER_ACL = (
    "ACL SETUSER producer on >PRODUCER_PASSWORD resetkeys resetchannels"
    " %W~arq:job:* %R~arq:result:* ~llm_router:reply:*"
    " %W~llm_router:queue %W~llm_router:queue:wake %W~llm_router:batch %W~llm_router:batch:wake"
    " %W~llm_router:deadline:* %W~llm_router:cancel:* &llm_router:cancel"
    " -@all +ping +hello +auth +select +client|setname"
    " +exists +set +zadd +lpush +ltrim +multi +exec +discard +wait"
    " +get +mget +blpop +lpop +watch +unwatch +publish"
)
WORKER_ACL = (
    "ACL SETUSER worker on >WORKER_PASSWORD resetkeys resetchannels"
    " ~arq:job:* ~arq:result:* ~arq:in-progress:* ~arq:retry:* ~llm_router:*"
    " &llm_router_metrics &llm_router:cancel"
    " -@all +ping +info +time +evalsha +script|load +script|exists"
    " +get +set +mget +del +exists +expire +pexpire +pttl +incr +decr"
    " +lpush +rpush +lpop +blpop +ltrim +llen +lindex +lrange"
    " +hget +hmget +hset +hdel +hexists +hlen +hgetall +hincrby"
    " +zadd +zrem +zcard +zcount +zscore +zrank +zrange +zrangebyscore"
    " +zremrangebyscore +zremrangebyrank +publish +subscribe +unsubscribe"
)


def _setuser(admin: SyncRedis, line: str) -> None:
    words = shlex.split(
        line.replace("PRODUCER_PASSWORD", PRODUCER_PASSWORD).replace(
            "WORKER_PASSWORD", WORKER_PASSWORD
        )
    )
    admin.execute_command(*words)  # type: ignore[no-untyped-call]


@pytest.fixture
def acl_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path, password=ADMIN_PASSWORD).start()
    admin = SyncRedis(port=server.port, password=ADMIN_PASSWORD, socket_timeout=5)
    try:
        _setuser(admin, PRODUCER_ACL)
        _setuser(admin, WORKER_ACL)
        admin.close()
        yield server
    finally:
        admin.close()
        server.stop()


def url(server: RedisServer, user: str, password: str) -> str:
    return f"redis://{user}:{password}@127.0.0.1:{server.port}/0"


async def test_producer_mode_under_acl(
    acl_server: RedisServer, stub: StubServer, tmp_path: Path
) -> None:
    producer_url = url(acl_server, "producer", PRODUCER_PASSWORD)
    env = worker_env(
        redis_url=url(acl_server, "worker", WORKER_PASSWORD),
        chains=chain_env(stub.url),
        poll_delay="5",  # a slow safety net: the wake-up is what serves the jobs
    )
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        async with RouterClient(producer_url, handover=False) as client:
            results = [await client.route(f"acl job {n}", timeout=30) for n in range(3)]
            handles = [await client.enqueue(f"acl burst {n}") for n in range(10)]
            burst = await asyncio.gather(*(h.result(timeout=30) for h in handles))
            # A repeated enqueue of a job id that has its result is not queued again.
            again = await client.enqueue("acl again", job_id=handles[0].job_id)
            assert (await again.result(timeout=5)).job_id == handles[0].job_id
            # The producer may cancel; a finished job is not cancelled.
            assert not await client.cancel(handles[0].job_id)
            hanging = await client.enqueue("stub:qwen=hang stub:haiku=hang acl cancel")
            await asyncio.sleep(0.3)
            assert await client.cancel(hanging.job_id)
            assert (await hanging.result(timeout=10, raise_on_failure=False)).status == (
                "cancelled"
            )
        # The shell example is a producer too: plain commands only, allowed by the ACL.
        shell = await asyncio.to_thread(
            subprocess.run,
            ["bash", str(Path(__file__).parents[2] / "examples" / "enqueue.sh"), "acl shell"],
            env={"PATH": os.environ.get("PATH", ""), "LLM_ROUTER_REDIS_URL": producer_url},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert shell.returncode == 0, shell.stderr
        assert json.loads(shell.stdout)["status"] == "ok"
        assert all(r.ok for r in [*results, *burst])
        assert all(r.model_used.startswith("ollama_chat/") for r in results)
        assert "NOPERM" not in worker.log_text()
        assert "NoPermission" not in worker.log_text()
    finally:
        worker.stop()
    assert WORKER_PASSWORD not in worker.log_text()


async def test_producer_is_kept_out_of_worker_keys(acl_server: RedisServer) -> None:
    producer = Redis.from_url(url(acl_server, "producer", PRODUCER_PASSWORD))
    try:
        assert await producer.ping()
        refused = [
            ("SET", "arq:in-progress:x", "worker-token", "PX", "1000"),
            ("INCR", "arq:retry:x"),
            ("HINCRBY", "llm_router:metrics:counters", "success", "1"),
            ("ZADD", "llm_router:queue:idle", "1", "w|1000"),
            ("LPUSH", "llm_router:queue:inbox:w", "x"),
            ("ZRANGE", "llm_router:queue", "0", "-1"),  # write-only: no reading the queue
            ("GET", "arq:job:x"),
            ("SET", "arq:result:x", "{}"),
            ("EVAL", "return 1", "0"),
            ("EVAL", script("enqueue.lua"), "0"),
            ("SCRIPT", "LOAD", "return 1"),
            ("PUBLISH", "llm_router_metrics", "{}"),
            ("KEYS", "*"),
        ]
        for command in refused:
            with pytest.raises(NoPermissionError):  # a NOPERM reply (redis-py drops the word)
                await producer.execute_command(*command)
    finally:
        await producer.aclose()


async def test_hand_over_mode_needs_more_than_the_producer_acl(acl_server: RedisServer) -> None:
    async with RouterClient(url(acl_server, "producer", PRODUCER_PASSWORD)) as client:
        assert client.handover
        with pytest.raises(NoPermissionError, match="evalsha"):
            await client.enqueue("handed over?")


def test_producer_mode_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_ROUTER_PRODUCER_MODE", "1")
    assert not RouterClient("redis://127.0.0.1:1/0").handover
    assert RouterClient("redis://127.0.0.1:1/0", handover=True).handover
    monkeypatch.delenv("LLM_ROUTER_PRODUCER_MODE")
    assert RouterClient("redis://127.0.0.1:1/0").handover


def test_wrong_password_is_one_line(acl_server: RedisServer) -> None:
    bad = url(acl_server, "producer", "not-the-password")
    env = worker_env(producer_mode="1")
    proc = subprocess.run(
        [sys.executable, "-m", "llm_router.client.cli", "--redis-url", bad, "route", "hi"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("llm-router: ")
    assert "not-the-password" not in proc.stderr


def test_the_documented_lines_are_these() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "protocol.md").read_text()
    assert PRODUCER_ACL in doc
    assert WORKER_ACL in doc


async def test_the_least_privilege_worker_does_all_its_work_without_a_refusal(
    acl_server: RedisServer, stub: StubServer, tmp_path: Path
) -> None:
    """Jobs handed over and polled, both lanes, heartbeats, metrics and /metrics, a budget,
    a breaker that opens, a capacity slot, a deadline, a cancel, a failure kept in the
    registry, a backfill whose cloud rows are parked for a Message Batch, a graceful stop:
    not one command or key refused to the worker."""
    from llm_router.client.backfill import Backfill

    local = {"model": "ollama_chat/qwen2.5:7b", "timeout": 10.0, "api_base": stub.url}
    haiku = {
        "model": "anthropic/claude-haiku-4-5-20251001",
        "timeout": 10.0,
        "api_base": stub.url,
        "api_key": "sk-ant-test-secret-0123456789",
    }
    flaky = {**local, "model": "ollama_chat/llama3.1:8b", "breaker_failures": 1}
    chains = {
        "default": [{**local, "max_in_flight": 1, "max_wait": 20}, haiku],
        "batch": [local, {**haiku, "batch_api": True}],
        "flaky": [flaky, haiku],
        "local_only": [local],
    }
    metrics_port = free_port()
    env = worker_env(
        redis_url=url(acl_server, "worker", WORKER_PASSWORD),
        chains=json.dumps(chains),
        budgets=json.dumps({"default": 100.0}),
        poll_delay="0.05",
        lease_seconds="2",
        batch_wait="0.5",
        batch_poll="0.3",
        metrics_port=str(metrics_port),
    )
    admin_url = url(acl_server, "default", ADMIN_PASSWORD)
    admin = Redis.from_url(admin_url)
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        async with (
            RouterClient(url(acl_server, "producer", PRODUCER_PASSWORD), handover=False) as plain,
            RouterClient(admin_url) as handing,  # the hand-over script needs the worker's keys
        ):
            assert (await plain.route("acl polled", timeout=30)).ok
            assert (await handing.route("acl handed over", timeout=30)).ok
            cloud = await plain.route("stub:qwen=http_500 acl to the cloud", timeout=30)
            assert cloud.model_used.startswith("anthropic/")  # under the budget
            for n in range(2):  # the first failure opens the breaker; the second skips it
                await plain.route(f"stub:llama=http_500 acl flaky {n}", chain="flaky", timeout=30)
            failed = await plain.enqueue("stub:qwen=http_500 acl failed", chain="local_only")
            assert (await failed.result(timeout=30, raise_on_failure=False)).status == "failed"
            slow = await plain.enqueue("stub:qwen=slow acl slow, leases renewed")
            hanging = await plain.enqueue("stub:qwen=hang acl cancel", chain="local_only")
            await asyncio.sleep(1.5)
            assert await plain.cancel(hanging.job_id)
            assert (await hanging.result(timeout=10, raise_on_failure=False)).status == (
                "cancelled"
            )
            assert (await slow.result(timeout=30)).ok
            expired = await plain.enqueue("acl expired", expires_in=0.001)
            assert (await expired.result(timeout=30, raise_on_failure=False)).status in (
                "expired",
                "ok",  # a worker may claim it within the millisecond
            )
        rows = tmp_path / "rows.jsonl"
        rows.write_text(
            "".join(
                json.dumps({"id": n, "prompt": f"{'stub:qwen=refusal ' * (n % 2)}acl row {n}"})
                + "\n"
                for n in range(5)
            )
        )
        summary = await Backfill(admin, rows, tmp_path / "out.jsonl").run()
        assert summary.written == 5
        assert summary.per_model == {"ollama_chat/qwen2.5:7b": 3, haiku["model"]: 2}
        scrape = await asyncio.to_thread(
            urllib.request.urlopen, f"http://127.0.0.1:{metrics_port}/metrics", timeout=10
        )
        assert b"llm_router_redis_used_memory_bytes" in scrape.read()
        await asyncio.sleep(6)  # a heartbeat (and its look at the server) after the start's
    finally:
        worker.stop()
    try:
        refused = await admin.execute_command("ACL", "LOG")
    finally:
        await admin.aclose()
    assert refused == [], [dict(zip(e[::2], e[1::2], strict=True)) for e in refused]
    assert "NOPERM" not in worker.log_text()
