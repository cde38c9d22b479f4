"""systemd's notify protocol: ready, alive (watchdog), stopping, and a status line.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (and with ``WatchdogSec=``
also ``WATCHDOG_USEC``): the worker says ``READY=1`` once Redis answers and it
serves, ``WATCHDOG=1`` from its event loop — so a wedged loop misses the deadline
and systemd restarts the worker — and ``STOPPING=1`` on SIGTERM. The protocol is
one datagram per message on a Unix socket; without ``NOTIFY_SOCKET`` nothing is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable, Mapping

import structlog

log = structlog.get_logger("llm_router.systemd")

#: The status line is refreshed this often when no watchdog asks for more.
STATUS_EVERY_S = 10.0


class Notifier:
    """Sends sd_notify messages; never raises, does nothing outside systemd."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        # "@name" is an abstract socket: its address starts with a NUL byte.
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self.watchdog_s: float | None = None
        usec, watchdog_pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and watchdog_pid in ("", str(os.getpid())):
            self.watchdog_s = int(usec) / 1e6
        self._socket: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *fields: str) -> bool:
        if not self.enabled:
            return False
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
            self._socket.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            if not self._warned:  # once: a broken socket would otherwise log every beat
                self._warned = True
                log.warning("systemd_notify_failed", error=f"{type(exc).__name__}: {exc}")
            return False
        return True

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def stopping(self, status: str = "stopping") -> None:
        self.notify("STOPPING=1", f"STATUS={status}")

    def keep_alive(self, status: Callable[[], str]) -> None:
        """Ping the watchdog at half its timeout (and refresh the status) from this loop."""
        if self.enabled:
            self._task = asyncio.create_task(self._alive(status), name="systemd watchdog")

    async def _alive(self, status: Callable[[], str]) -> None:
        every = min(self.watchdog_s / 2, STATUS_EVERY_S) if self.watchdog_s else STATUS_EVERY_S
        while True:
            await asyncio.sleep(every)
            fields = [f"STATUS={status()}"]
            if self.watchdog_s:
                fields.insert(0, "WATCHDOG=1")
            self.notify(*fields)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._socket is not None:
            self._socket.close()
            self._socket = None
