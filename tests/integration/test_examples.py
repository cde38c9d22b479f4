"""The producers in examples/, run as a user runs them, against a real worker."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
from redis.asyncio import Redis

from llm_router_testing.servers import free_port
from tests.integration.conftest import REDIS_URL, WorkerProcess

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).parents[2] / "examples"
SCHEMA = {
    "type": "object",
    "required": ["answer", "ok"],
    "properties": {"answer": {"type": "string"}, "ok": {"type": "boolean"}},
}


async def run_example(
    command: list[str], queue: str, *args: str, url: str = REDIS_URL
) -> subprocess.CompletedProcess[str]:
    """An example as a user runs it: settings from LLM_ROUTER_* variables only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_ROUTER_")}
    env |= {"LLM_ROUTER_REDIS_URL": url, "LLM_ROUTER_QUEUE_NAME": queue}
    return await asyncio.to_thread(
        subprocess.run, [*command, *args], env=env, capture_output=True, text=True, timeout=60
    )


async def enqueue_sh(
    queue: str, *args: str, url: str = REDIS_URL
) -> subprocess.CompletedProcess[str]:
    if shutil.which("redis-cli") is None:  # pragma: no cover - .ci/run installs redis-server
        pytest.fail("examples/enqueue.sh needs redis-cli")
    return await run_example(["bash", str(EXAMPLES / "enqueue.sh")], queue, *args, url=url)


async def test_the_shell_example_routes_a_prompt_with_a_schema(
    worker: WorkerProcess, queue_name: str, tmp_path: Path
) -> None:
    schema = tmp_path / "answer.json"
    schema.write_text(json.dumps(SCHEMA, indent=2))  # newlines and all, as a user writes it
    prompt = 'stub:qwen=json A "quoted" prompt,\nwith a newline, a tab\there and ünïcode'
    run = await enqueue_sh(queue_name, "--schema", str(schema), "--context", "tests.sh", prompt)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["status"] == "ok"
    assert result["model_used"] == "ollama_chat/qwen2.5:7b"
    assert result["context"] == "tests.sh"
    jsonschema.validate(result["content"], SCHEMA)


@pytest.mark.parametrize(
    ("args", "status"),
    [
        (["stub:*=refusal every model refuses"], "failed"),
        (["--chain", "nope", "hi"], "invalid_request"),
    ],
)
async def test_the_shell_example_exits_1_with_the_result_when_it_is_not_ok(
    worker: WorkerProcess, queue_name: str, args: list[str], status: str
) -> None:
    run = await enqueue_sh(queue_name, *args)
    assert run.returncode == 1, run.stderr
    assert json.loads(run.stdout)["status"] == status


async def test_the_shell_example_says_which_error(redis: Redis) -> None:
    usage = await enqueue_sh("q")
    assert usage.returncode == 2
    assert "usage:" in usage.stderr
    away = await enqueue_sh("q", "hi", url=f"redis://:secret@127.0.0.1:{free_port()}/0")
    assert away.returncode == 3
    assert "cannot enqueue" in away.stderr
    assert "secret" not in away.stderr
    queue = f"llm_router:test:nobody:{os.getpid()}"
    nobody = await enqueue_sh(queue, "--timeout", "1", "hi")
    assert nobody.returncode == 4
    assert "no result for job" in nobody.stderr
    job_id = nobody.stderr.split("no result for job ")[1].split()[0]
    assert await redis.zscore(queue, job_id) is not None  # it was queued, nobody served it
    await redis.delete(queue, queue + ":wake", f"arq:job:{job_id}")


NODE = EXAMPLES / "node"


async def enqueue_node(queue: str, *args: str) -> subprocess.CompletedProcess[str]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed on this machine (.ci/run installs it)")
    if not (NODE / "node_modules" / "redis").is_dir():
        if shutil.which("npm") is None:
            pytest.skip("node is installed but npm is not: examples/node's packages cannot be")
        pytest.fail("examples/node has no node_modules: `python3 dev.py test` runs `npm ci` there")
    return await run_example([node, str(NODE / "enqueue.mjs")], queue, *args)


async def test_the_node_example_routes_a_prompt_with_a_schema(
    worker: WorkerProcess, queue_name: str, tmp_path: Path
) -> None:
    schema = tmp_path / "answer.json"
    schema.write_text(json.dumps(SCHEMA))
    run = await enqueue_node(
        queue_name, "--schema", str(schema), "--context", "tests.node", 'stub:qwen=json "hi"'
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert (result["status"], result["context"]) == ("ok", "tests.node")
    jsonschema.validate(result["content"], SCHEMA)
    failed = await enqueue_node(queue_name, "--chain", "nope", "hi")
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["status"] == "invalid_request"


def test_the_node_lock_records_no_download_address() -> None:
    lock = json.loads((NODE / "package-lock.json").read_text())
    assert lock["lockfileVersion"] == 3
    packages = {k: v for k, v in lock["packages"].items() if k}
    assert packages, "the lock pins the dependencies"
    for name, entry in packages.items():
        assert "resolved" not in entry, name
        assert entry["integrity"].startswith("sha512-"), name
