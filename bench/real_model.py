"""The real local model's latency per case: SmolLM2-135M under llama-cpp-python's server,
one worker, the cloud a stub (``python3 dev.py install --real-model`` first).

Sequential jobs per case, timed from enqueue to result at the producer, and the local
attempt's own latency: a plain answer, a JSON answer under a schema (constrained
decoding), an answer cut at ``max_tokens`` 8 (rejected as truncated, then the stub
cloud), and a prompt over the 2,048-token context (skipped unsent, then the cloud).
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from bench.common import median, quantile, say, table
from bench.procs import start_ours, wait_listening
from llm_router.client import RouterClient
from llm_router_testing.real_model import INSTALL_HINT, MODEL, LlamaServer, available

HAIKU = "anthropic/claude-haiku-4-5-20251001"
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
CASES: list[tuple[str, str, str, dict[str, Any] | None]] = [
    ("plain", "default", "What is the capital of France? Answer in one word.", None),
    ("json", "default", "Name the capital of France as JSON.", SCHEMA),
    ("truncated", "short", "Write a long story about a dragon.", None),
    ("over context", "default", "word " * 3000, None),
]


async def run(redis_url: str, stub_url: str, run_id: str, jobs: int) -> dict[str, Any]:
    if not available():
        raise SystemExit(f"real_model needs the real-model group: {INSTALL_HINT}")
    with tempfile.TemporaryDirectory(prefix="bench-llama-") as tmp:
        llama = LlamaServer(Path(tmp) / "server.log").start()
        try:
            return await _measure(llama, redis_url, stub_url, run_id, jobs)
        finally:
            llama.stop()


async def _measure(
    llama: LlamaServer, redis_url: str, stub_url: str, run_id: str, jobs: int
) -> dict[str, Any]:
    haiku = {"model": HAIKU, "timeout": 10.0, "api_base": stub_url, "api_key": "sk-ant-bench-0"}
    local = llama.chain_entry()
    chains = {
        "default": [local, haiku],
        "short": [{**local, "params": {"temperature": 0, "max_tokens": 8}}, haiku],
    }
    queue = f"bench:{run_id}:real:{uuid.uuid4().hex[:4]}"
    worker = start_ours(
        "real-model",
        redis_url=redis_url,
        queue=queue,
        chains=json.dumps(chains),
        metrics_channel=f"bench:{run_id}:metrics",
    )
    redis = Redis.from_url(redis_url)
    rows: list[list[object]] = []
    cases: dict[str, Any] = {}
    try:
        await wait_listening(worker, redis)
        async with RouterClient(redis_url, queue_name=queue) as client:
            await client.route("warm-up: say hi", timeout=60)
            for name, chain, prompt, schema in CASES:
                total, attempt, outcomes = [], [], set()
                for n in range(jobs):
                    started = time.perf_counter()
                    result = await client.route(
                        f"{prompt} ({n})", schema=schema, chain=chain, timeout=120
                    )
                    total.append((time.perf_counter() - started) * 1000)
                    first = result.attempts[0]
                    attempt.append(float(first.latency_ms))
                    outcomes.add(f"{first.outcome} -> {result.model_used}")
                cases[name] = {
                    "p50_ms": median(total),
                    "p95_ms": quantile(total, 0.95),
                    "local_p50_ms": median(attempt),
                    "local_p95_ms": quantile(attempt, 0.95),
                    "outcomes": sorted(outcomes),
                    "n": jobs,
                }
                c = cases[name]
                rows.append(
                    [
                        name,
                        jobs,
                        f"{c['p50_ms']:.0f}",
                        f"{c['p95_ms']:.0f}",
                        f"{c['local_p50_ms']:.0f}",
                        f"{c['local_p95_ms']:.0f}",
                        "; ".join(c["outcomes"]),
                    ]
                )
    finally:
        worker.stop()
        await redis.aclose()
    say(f"Real model ({MODEL}, llama-cpp-python, n_ctx {llama.n_ctx}), sequential jobs")
    header = ["case", "n", "p50 ms", "p95 ms", "local p50", "local p95", "local outcome"]
    say(table(header, rows))
    plain = cases["plain"]["outcomes"] == [f"success -> {MODEL}"]
    skipped = cases["over context"]["local_p95_ms"] < 100
    return {
        "benchmark": "real_model",
        "cases": cases,
        "floors": {"plain_is_local": plain, "over_context_skipped_unsent": skipped},
    }
