"""Worker processes forked from one that has imported the worker already (gunicorn's
"preload"), so that a test's worker starts in a fraction of a second instead of the
~8 s of CPU importing litellm costs on these machines — the suite starts ~50 of them.

The child runs the same ``llm_router.worker.cli.main()`` with the test's environment
and its output in the test's log file; it is a real process, signalled and killed by
pid like any other. Only the interpreter start and its imports are shared. A test of
start-up itself uses ``WorkerProcess(..., fresh=True)``; ``TEST_FRESH_WORKERS=1``
starts every worker as a fresh interpreter.

Protocol: one JSON object a line over a Unix socket, answered by one line:
``{"op": "spawn", "env": {...}, "log": path}`` → ``{"pid": n}``;
``{"op": "wait", "pid": n, "timeout": s}`` → ``{"returncode": n or null}``.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any


class Preloaded:
    """The test side: starts the preloading process once, asks it to fork workers."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "preload.sock")
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_ROUTER_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.preload", self.path],
            env=env,
            stdout=(directory / "preload.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while not os.path.exists(self.path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((directory / "preload.log").read_text())
            time.sleep(0.05)

    def ask(self, request: dict[str, Any], timeout: float | None = 30.0) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(None if timeout is None else timeout + 5)
            sock.connect(self.path)
            sock.sendall(json.dumps(request).encode() + b"\n")
            answer: dict[str, Any] = json.loads(sock.makefile("rb").readline())
            return answer

    def spawn(self, env: dict[str, str], log_path: Path) -> ForkedProcess:
        pid = int(self.ask({"op": "spawn", "env": env, "log": str(log_path)})["pid"])
        return ForkedProcess(self, pid)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class ForkedProcess:
    """The part of ``subprocess.Popen`` the tests use, for a forked worker."""

    def __init__(self, preloaded: Preloaded, pid: int) -> None:
        self.preloaded = preloaded
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.preloaded.ask({"op": "wait", "pid": self.pid, "timeout": 0})[
                "returncode"
            ]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            answer = self.preloaded.ask(
                {"op": "wait", "pid": self.pid, "timeout": timeout}, timeout=timeout
            )
            self.returncode = answer["returncode"]
        if self.returncode is None:
            raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


# --- the preloading process ------------------------------------------------------------------


def _child(env: dict[str, str], log: str, server: socket.socket, conn: socket.socket) -> None:
    """In the forked child: the test's environment and log, then the worker's own main()."""
    code = 1
    try:
        server.close()
        conn.close()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(env)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        from llm_router.worker import cli

        code = cli.main([])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve(path: str) -> None:
    # What every worker imports before it serves (litellm above all), paid once here.
    from llm_router.worker import calls, cli, jobs  # noqa: F401

    calls.warm_up()
    exited: dict[int, int] = {}
    waiting: list[tuple[socket.socket, int, float]] = []
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path + ".tmp")
    server.listen(64)
    os.rename(path + ".tmp", path)  # the test side waits for this name
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        readable, _, _ = select.select([server], [], [], 0.02)
        while True:  # reap
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            exited[pid] = os.waitstatus_to_exitcode(status)
        still: list[tuple[socket.socket, int, float]] = []
        for conn, pid, deadline in waiting:
            if pid in exited or time.monotonic() >= deadline:
                conn.sendall(json.dumps({"returncode": exited.get(pid)}).encode() + b"\n")
                conn.close()
            else:
                still.append((conn, pid, deadline))
        waiting = still
        if not readable:
            continue
        conn, _ = server.accept()
        request = json.loads(conn.makefile("rb").readline())
        if request["op"] == "spawn":
            pid = os.fork()
            if pid == 0:
                _child(request["env"], request["log"], server, conn)
            conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            conn.close()
        else:
            timeout = request.get("timeout")
            deadline = time.monotonic() + (1e9 if timeout is None else float(timeout))
            waiting.append((conn, int(request["pid"]), deadline))


if __name__ == "__main__":
    serve(sys.argv[1])
