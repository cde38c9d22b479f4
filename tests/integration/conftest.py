"""Real parts: the Redis server on 127.0.0.1, worker processes, stub models on loopback."""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from llm_router.client import RouterClient
from llm_router_testing.servers import SERVER_KIND_ENV, RedisServer
from llm_router_testing.stubs import StubServer
from tests.integration.preload import ForkedProcess, Preloaded


def _test_db() -> int:
    """Each pytest-xdist process gets a Redis database of its own (db 1, 2, ...), so the
    shared counters, heartbeats and budgets of one never show in another's assertions."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ... under xdist
    return 1 + int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0


def _shared_url() -> str:
    """``TEST_REDIS_URL``; else, with ``TEST_REDIS_SERVER`` (a kind of
    :data:`~llm_router_testing.servers.SERVER_KINDS`), a server of that kind of this
    test process's own; else the Redis on 127.0.0.1:6379."""
    if url := os.environ.get("TEST_REDIS_URL"):
        return url
    if os.environ.get(SERVER_KIND_ENV):
        server = RedisServer(Path(tempfile.mkdtemp(prefix="llmr-redis-"))).start()
        atexit.register(server.stop)
        return f"redis://127.0.0.1:{server.port}/{_test_db()}"
    return f"redis://127.0.0.1:6379/{_test_db()}"


REDIS_URL = _shared_url()

pytestmark = pytest.mark.integration


#: Room for any prompt and any answer: for tests of what the checks make of huge ones.
ROOMY: dict[str, Any] = {"context_window": 100_000_000, "params": {"max_tokens": 10_000_000}}


HAIKU = "anthropic/claude-haiku-4-5-20251001"


def cloud_model(stub_url: str, timeout: float = 10.0) -> dict[str, Any]:
    """Claude Haiku at a stub server: the cloud step after a local one under test."""
    return {"model": HAIKU, "timeout": timeout, "api_base": stub_url, "api_key": "sk-ant-test-0"}


def chain_env(
    stub_url: str,
    *,
    local_timeout: float = 1.0,
    cloud_timeout: float = 2.0,
    roomy: bool = False,
) -> str:
    """The seed's chain, every model pointed at the stub server.

    These tests make models fail on purpose, one rule at a time; the circuit breaker
    (tested on its own in test_local_model.py) is kept from opening between them.
    ``roomy``: no context window or answer limit gets in the way (:data:`ROOMY`).
    """
    quiet = {"api_base": stub_url, "breaker_failures": 1000, **(ROOMY if roomy else {})}
    cloud = {**quiet, "api_key": "sk-ant-test-secret-0123456789"}
    local = {"model": "ollama_chat/qwen2.5:7b", "timeout": local_timeout, **quiet}
    chains: dict[str, Any] = {
        "default": [
            local,
            {"model": "anthropic/claude-haiku-4-5-20251001", "timeout": cloud_timeout, **cloud},
            {"model": "anthropic/claude-sonnet-4-6", "timeout": cloud_timeout, **cloud},
        ],
        "local_only": [local],
    }
    return json.dumps(chains)


def worker_env(**settings: str) -> dict[str, str]:
    """The parent's environment minus its LLM_ROUTER_* settings, plus these; a test's
    queue comes with a batch queue of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_ROUTER_")}
    if "queue_name" in settings:
        settings.setdefault("batch_queue_name", settings["queue_name"] + ":batch")
    env.update({"LLM_ROUTER_" + k.upper(): v for k, v in settings.items()})
    env.setdefault("LLM_ROUTER_LOG_FORMAT", "json")
    return env


def router_cli(
    *args: str, url: str = REDIS_URL, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """``llm-router --redis-url URL ARGS...`` in a new interpreter, without this process's
    LLM_ROUTER_* settings; wide, so that tables are not cut."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_ROUTER_")}
    return subprocess.run(
        [sys.executable, "-m", "llm_router.client.cli", "--redis-url", url, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**env, "COLUMNS": "200"},
    )


_preloaded: Preloaded | None = None


def preloaded() -> Preloaded:
    """This test process's preloading process (started on first use, stopped at exit)."""
    global _preloaded
    if _preloaded is None:
        _preloaded = Preloaded(Path(tempfile.mkdtemp(prefix="llmr-preload-")))
        atexit.register(_preloaded.close)
    return _preloaded


class WorkerProcess:
    """One ``llm-router-worker`` process, its log kept in a file for assertions.

    Forked from a process that has imported the worker already (:mod:`preload`), unless
    ``fresh``: then a new interpreter runs ``python -m llm_router.worker.cli``.
    """

    def __init__(self, env: dict[str, str], log_path: Path, *, fresh: bool = False) -> None:
        self.env = env
        self.log_path = log_path
        self.fresh = fresh or os.environ.get("TEST_FRESH_WORKERS") == "1"
        self.proc: subprocess.Popen[bytes] | ForkedProcess | None = None

    def start(self, ready_timeout: float = 90.0) -> WorkerProcess:
        return self.launch().wait_ready(ready_timeout)

    def launch(self) -> WorkerProcess:
        """Start the process without waiting (start several, then wait for each)."""
        if not self.fresh:
            self.proc = preloaded().spawn(self.env, self.log_path)
            return self
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llm_router.worker.cli"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        return self

    def wait_ready(self, ready_timeout: float = 90.0) -> WorkerProcess:
        assert self.proc is not None
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if "worker_ready" in self.log_text():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited {self.proc.returncode}:\n{self.log_text()}")
            time.sleep(0.05)
        raise TimeoutError(f"worker not ready in {ready_timeout}s:\n{self.log_text()}")

    @property
    def worker_id(self) -> str | None:
        """The token this worker writes into its leases (from its worker_ready line)."""
        for record in self.log_records():
            if record.get("event") == "worker_ready":
                return str(record.get("worker_id"))
        return None

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.log_records() if r.get("event") == name]

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, as in a power loss or the OOM killer."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.log_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="session")
def redis_available() -> str:
    client = SyncRedis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except Exception as exc:  # pragma: no cover - the CI script starts one
        pytest.fail(f"integration tests need the Redis server at {REDIS_URL}: {exc}")
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture(scope="session")
def stub() -> Iterator[StubServer]:
    with StubServer(slow_delay=0.3) as server:
        yield server


@pytest.fixture(scope="session")
def queue_name() -> str:
    return f"llm_router:test:{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def worker(
    redis_available: str,
    stub: StubServer,
    queue_name: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[WorkerProcess]:
    env = worker_env(
        redis_url=redis_available,
        queue_name=queue_name,
        chains=chain_env(stub.url),
        max_jobs="20",
        poll_delay="0.05",
    )
    proc = WorkerProcess(env, tmp_path_factory.mktemp("worker") / "worker.log").start()
    yield proc
    proc.stop()


@pytest.fixture
async def redis(redis_available: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_available)
    yield client
    await client.aclose()


@pytest.fixture
async def client(worker: WorkerProcess, queue_name: str) -> AsyncIterator[RouterClient]:
    async with RouterClient(REDIS_URL, queue_name=queue_name) as c:
        yield c
