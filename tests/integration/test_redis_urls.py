"""Redis URLs with a password (percent-encoded) and with TLS work for worker and client."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from llm_router.client import RouterClient
from llm_router_testing.servers import RedisServer, make_tls_files
from llm_router_testing.stubs import StubServer
from tests.integration.conftest import WorkerProcess, chain_env, worker_env

pytestmark = pytest.mark.integration

PASSWORD = "p@ss:w/rd%?#s3cret"


def tls_supported() -> bool:
    if shutil.which("openssl") is None:
        return False
    help_text = subprocess.run(
        ["redis-server", "--tls-port", "0", "--test-memory", "0"], capture_output=True, text=True
    )
    return "tls" not in (help_text.stderr + help_text.stdout).lower() or True


@pytest.fixture(params=["password", "password+tls"])
def secured_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    tls = make_tls_files(tmp_path) if request.param.endswith("tls") else None
    server = RedisServer(tmp_path, password=PASSWORD, tls=tls).start()
    try:
        if tls is None:
            yield f"redis://:{quote(PASSWORD, safe='')}@127.0.0.1:{server.port}/0"
        else:
            yield (
                f"rediss://:{quote(PASSWORD, safe='')}@127.0.0.1:{server.port}/0"
                f"?ssl_ca_certs={quote(str(tls['ca']))}"
            )
    finally:
        server.stop()


async def test_worker_and_client_over_secured_redis(
    secured_url: str, stub: StubServer, tmp_path: Path
) -> None:
    queue = f"llm_router:test:auth:{uuid.uuid4().hex[:6]}"
    env = worker_env(redis_url=secured_url, queue_name=queue, chains=chain_env(stub.url))
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        async with RouterClient(secured_url, queue_name=queue) as client:
            result = await client.route("hello over a locked door", timeout=30)
        assert result.ok
        assert result.model_used.startswith("ollama_chat/")
    finally:
        worker.stop()
    assert PASSWORD not in worker.log_text()
    assert quote(PASSWORD, safe="") not in worker.log_text()
