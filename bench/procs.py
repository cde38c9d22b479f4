"""Processes a benchmark starts: the stub server, workers, drivers. Each is stopped by its pid."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import select
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from arq.connections import ArqRedis
from redis.asyncio import Redis

from bench.common import JOB_TIMEOUT_S, PROMPT, PYTHON, REPO_ROOT, base_env, note
from llm_router.client import RouterClient, RouteResult, build_request

LOG_DIR = Path(tempfile.gettempdir()) / "llm-router-bench"
_STARTED: list[Managed] = []


class Managed:
    """One child process in a session of its own (a Ctrl-C reaches only the bench)."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], *, pipe_stdout: bool = False
    ) -> None:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log_path = LOG_DIR / f"{name}-{os.getpid()}-{time.monotonic_ns()}.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                argv,
                env=env,
                cwd=REPO_ROOT,
                stdin=subprocess.PIPE if pipe_stdout else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipe_stdout else log,
                stderr=log,
                start_new_session=True,
            )
        self.pid = self.proc.pid
        self._buffer = b""
        _STARTED.append(self)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        if not self.alive:
            raise RuntimeError(
                f"{self.name} (pid {self.pid}) exited {self.proc.returncode}:\n{self.log_tail()}"
            )

    def read_line(self, timeout: float) -> str:
        """One line of the child's stdout, or TimeoutError/RuntimeError."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no output line within {timeout}s")
            readable, _, _ = select.select([fd], [], [], min(left, 0.5))
            if readable:
                chunk = os.read(fd, 65536)
                if not chunk:
                    self.check_alive()
                    raise RuntimeError(f"{self.name} closed its stdout:\n{self.log_tail()}")
                self._buffer += chunk
            else:
                self.check_alive()
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        self.proc.stdin.flush()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM this pid, then SIGKILL it when it does not exit in time."""
        if self in _STARTED:
            _STARTED.remove(self)
        if self.proc.stdin is not None:  # a driver reads end of input as "stop"
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                note(f"{self.name} (pid {self.pid}) ignored SIGTERM; killing it")
                self.proc.kill()
                self.proc.wait(5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


def stop_all() -> None:
    """Stop every process still running, newest first (also called at exit)."""
    for managed in reversed(list(_STARTED)):
        try:
            managed.stop()
        except Exception as exc:  # keep stopping the others
            note(f"could not stop {managed.name} (pid {managed.pid}): {exc}")


atexit.register(stop_all)


# ---------------------------------------------------------------- the processes


def start_stub() -> tuple[Managed, str]:
    """The stub model server in a process of its own; it prints its URL when it listens."""
    stub = Managed(
        "stub",
        [PYTHON, "-m", "llm_router_testing.stubs", "--port", "0"],
        base_env(),
        pipe_stdout=True,
    )
    url = stub.read_line(timeout=30).strip()
    if not url.startswith("http://127.0.0.1:"):
        raise RuntimeError(f"stub printed {url!r}, not its URL")
    return stub, url


def start_ours(
    name: str,
    *,
    redis_url: str,
    queue: str,
    chains: str,
    metrics_channel: str,
    max_jobs: int | None = None,
    extra: dict[str, str] | None = None,
) -> Managed:
    """``python -m llm_router.worker.cli`` with settings from the environment only
    (``extra``: more ``LLM_ROUTER_*`` variables)."""
    env = base_env()
    env.update(
        {
            "LLM_ROUTER_REDIS_URL": redis_url,
            "LLM_ROUTER_QUEUE_NAME": queue,
            "LLM_ROUTER_BATCH_QUEUE_NAME": queue + ":batch",
            "LLM_ROUTER_CHAINS": chains,
            "LLM_ROUTER_METRICS_CHANNEL": metrics_channel,
            "LLM_ROUTER_LOG_LEVEL": "WARNING",
            "LLM_ROUTER_LOG_FORMAT": "json",
        }
    )
    if max_jobs is not None:
        env["LLM_ROUTER_MAX_JOBS"] = str(max_jobs)
    env.update(extra or {})
    return Managed(name, [PYTHON, "-m", "llm_router.worker.cli"], env)


def start_arq(
    name: str,
    *,
    redis_url: str,
    queue: str,
    chains: str,
    metrics_channel: str,
    poll_delay: float | None,
) -> Managed:
    """A plain arq worker (bench/arq_baseline.py): pickle, polling, arq's defaults."""
    argv = [PYTHON, "-m", "bench.arq_baseline", "--redis-url", redis_url, "--queue", queue]
    argv += ["--chains", chains, "--metrics-channel", metrics_channel]
    if poll_delay is not None:
        argv += ["--poll-delay", str(poll_delay)]
    return Managed(name, argv, base_env())


def start_driver(name: str, mode: str, *, redis_url: str, queue: str, chains: str) -> Managed:
    """A load driver (bench/driver.py): producers through the queue, or the in-process chain."""
    argv = [PYTHON, "-m", "bench.driver", "--mode", mode, "--redis-url", redis_url]
    argv += ["--queue", queue, "--chains", chains]
    return Managed(name, argv, base_env(), pipe_stdout=True)


async def wait_driver_ready(driver: Managed, timeout: float = 90.0) -> None:
    line = await asyncio.to_thread(driver.read_line, timeout)
    if json.loads(line).get("ready") is not True:
        raise RuntimeError(f"{driver.name}: unexpected first line {line!r}")


# ---------------------------------------------------------------- readiness probes


def tcp_ports(pid: int) -> set[int]:
    """The local ports of the TCP sockets a process holds (from /proc)."""
    inodes: set[str] = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return set()
    for fd in fds:
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[9] in inodes:
                ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


async def wait_listening(worker: Managed, redis: Redis, timeout: float = 120.0) -> float:
    """Ready = its wake-up listener is blocked in BLPOP (a Redis client of this pid).

    Works for each of several workers on one queue, where a probe job proves only one.
    Returns the seconds waited.
    """
    start = time.monotonic()
    deadline = start + timeout
    while time.monotonic() < deadline:
        worker.check_alive()
        ports = tcp_ports(worker.pid)
        if ports:
            for client in await redis.client_list():
                port = int(str(client.get("addr", ":0")).rsplit(":", 1)[1])
                if client.get("cmd") == "blpop" and port in ports:
                    return time.monotonic() - start
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{worker.name} not listening within {timeout}s:\n{worker.log_tail()}")


async def probe_ours(
    worker: Managed, client: RouterClient, ids: list[str], timeout: float = 120.0
) -> RouteResult:
    """One job through, waiting while the process lives; its id goes to ``ids`` at once."""
    handle = await client.enqueue(PROMPT)
    ids.append(handle.job_id)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        worker.check_alive()
        try:
            return await handle.result(timeout=0.5)
        except TimeoutError:
            continue
    raise TimeoutError(f"{worker.name} answered no job within {timeout}s:\n{worker.log_tail()}")


async def probe_arq(
    worker: Managed, pool: ArqRedis, queue: str, ids: list[str], timeout: float = 120.0
) -> dict[str, Any]:
    """The same for a plain arq worker (whose result comes back pickled)."""
    job = await pool.enqueue_job("route", build_request(PROMPT).wire(), _queue_name=queue)
    if job is None:
        raise RuntimeError("arq refused the probe job")
    ids.append(job.job_id)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        worker.check_alive()
        try:
            result: dict[str, Any] = await job.result(timeout=0.5, poll_delay=0.05)
            return result
        except TimeoutError:
            continue
    raise TimeoutError(f"{worker.name} answered no job within {timeout}s:\n{worker.log_tail()}")


async def run_job_arq(
    pool: ArqRedis, queue: str, poll_delay: float | None, ids: list[str]
) -> dict[str, Any]:
    """Enqueue one job on a plain arq queue and wait for it at the given (or default) poll."""
    job = await pool.enqueue_job("route", build_request(PROMPT).wire(), _queue_name=queue)
    if job is None:
        raise RuntimeError("arq refused the job")
    ids.append(job.job_id)
    if poll_delay is None:
        result: dict[str, Any] = await job.result(timeout=JOB_TIMEOUT_S)
    else:
        result = await job.result(timeout=JOB_TIMEOUT_S, poll_delay=poll_delay)
    return result
