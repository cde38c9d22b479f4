"""systemd's notify protocol as a real worker speaks it: a test socket is NOTIFY_SOCKET."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llm_router.worker.systemd import Notifier
from llm_router_testing.stubs import StubServer
from tests.integration.conftest import WorkerProcess, chain_env, worker_env

pytestmark = pytest.mark.integration


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    yield sock, path
    sock.close()


def messages_until(sock: socket.socket, wanted: str, timeout: float) -> list[str]:
    """Every datagram received until one holds ``wanted`` (or the timeout)."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            seen.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
        if wanted in seen[-1].splitlines():
            return seen
    raise AssertionError(f"no {wanted} in {timeout}s; got {seen}")


def test_ready_then_watchdog_then_stopping_on_sigterm(
    redis_available: str,
    stub: StubServer,
    notify_socket: tuple[socket.socket, str],
    tmp_path: Path,
) -> None:
    sock, path = notify_socket
    env = worker_env(
        redis_url=redis_available,
        queue_name=f"llm_router:test:systemd:{os.getpid()}",
        chains=chain_env(stub.url),
    )
    env |= {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}  # ping every 0.5 s
    worker = WorkerProcess(env, tmp_path / "worker.log", fresh=True).launch()  # a real start
    try:
        ready = messages_until(sock, "READY=1", timeout=90)
        assert ready[-1].splitlines()[1].startswith("STATUS=serving llm_router:test:systemd:")
        pings = [m for m in messages_until(sock, "WATCHDOG=1", timeout=5)]
        assert "STATUS=" in pings[-1]
        second = messages_until(sock, "WATCHDOG=1", timeout=5)
        assert second  # it keeps pinging from the event loop
        worker.signal(signal.SIGTERM)
        stopping = messages_until(sock, "STOPPING=1", timeout=10)
        assert any(line.startswith("STATUS=stopping") for line in stopping[-1].splitlines())
        assert worker.proc is not None
        assert worker.proc.wait(30) == 0
    finally:
        worker.stop()


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.notify("READY=1") is False


def test_an_abstract_socket_and_a_watchdog_for_another_pid() -> None:
    name = f"llm-router-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "2000000"})
        assert notifier.watchdog_s == 2.0
        notifier.ready("up")
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"
        other = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "5", "WATCHDOG_PID": "1"})
        assert other.watchdog_s is None  # the watchdog is another process's
    finally:
        sock.close()


def test_a_vanished_socket_is_warned_about_once_and_never_raises(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.notify("READY=1") is False
    assert notifier.notify("WATCHDOG=1") is False
