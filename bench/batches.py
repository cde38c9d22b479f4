"""The batch lane's cloud leg, real time against Message Batches: the same backfill twice.

Two workers, a local stub that refuses every other row (those go to Claude Haiku, a
stub too) and ``llm-router backfill`` as a process of its own. Run A calls Haiku in
real time; run B gives Haiku ``batch_api`` (batches sent at ``batch_size`` or after
``batch_wait``, the stub ending each after ``batch_seconds``). Same rows, same run:
the cloud rows' cost (from the output's attempts), the real-time cloud calls and the
batches the stub saw, and the wall time to the backfill's exit.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from bench.common import PYTHON, base_env, forget_keys, queue_keys, ratio, say, table
from bench.procs import start_ours, wait_listening
from llm_router_testing.stubs import StubServer

LOCAL = "ollama_chat/qwen2.5:7b"
HAIKU = "anthropic/claude-haiku-4-5-20251001"
TO_CLOUD = "stub:qwen=refusal stub:*=echo\n"
LOCALLY = "stub:*=echo\n"


async def run(redis_url: str, run_id: str, rows: int, batch_seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-batches-") as tmp:
        source = Path(tmp) / "input.jsonl"
        with source.open("w") as f:
            for n in range(rows):
                prefix = TO_CLOUD if n % 2 else LOCALLY
                text = f"{prefix}row {n}: " + "words of a backfill row " * 8
                f.write(json.dumps({"id": f"r{n}", "prompt": text}) + "\n")
        runs = {}
        for label, batch_api in (("real time", False), ("batch_api", True)):
            runs[label] = await _one(redis_url, run_id, source, Path(tmp), batch_api, batch_seconds)
    live, batch = runs["real time"], runs["batch_api"]
    say(f"batches: {rows} rows, half to the cloud; batch_seconds {batch_seconds}")
    say(table(
        ["run", "cloud rows", "cloud cost $", "real-time calls", "batches", "wall s"],
        [
            [name, r["cloud_rows"], f"{r['cost_usd']:.6f}", r["real_time_calls"], r["batches"],
             f"{r['wall_s']:.1f}"]
            for name, r in runs.items()
        ],
    ))  # fmt: skip
    cost_ratio = ratio(batch["cost_usd"], live["cost_usd"])
    say(f"batch cost / real-time cost: {cost_ratio}")
    return {
        "benchmark": "batches",
        "rows": rows,
        "runs": runs,
        "cost_ratio": cost_ratio,
        "floors": {"cost_ratio_at_most_0.5": cost_ratio is not None and cost_ratio <= 0.5001},
    }


async def _one(
    redis_url: str, run_id: str, source: Path, tmp: Path, batch_api: bool, batch_seconds: float
) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:6]
    queue = f"bench:{run_id}:batches:{tag}"
    with StubServer(batch_seconds=batch_seconds) as stub:
        local = {"model": LOCAL, "timeout": 5.0, "api_base": stub.url, "breaker_failures": 1000}
        haiku = {"model": HAIKU, "timeout": 30.0, "api_base": stub.url,
                 "api_key": "sk-ant-bench-0", "batch_api": batch_api}  # fmt: skip
        chains = json.dumps({"default": [local, haiku], "batch": [local, haiku]})
        extra = {"LLM_ROUTER_BATCH_SIZE": "500", "LLM_ROUTER_BATCH_WAIT": "2",
                 "LLM_ROUTER_BATCH_POLL": "1"}  # fmt: skip
        workers = [
            start_ours(f"batches-{n}", redis_url=redis_url, queue=queue, chains=chains,
                       metrics_channel=f"bench:{run_id}:metrics", max_jobs=40, extra=extra)
            for n in range(2)
        ]  # fmt: skip
        redis = Redis.from_url(redis_url)
        output = tmp / f"output-{tag}.jsonl"
        try:
            for worker in workers:
                await wait_listening(worker, redis)
            argv = [PYTHON, "-m", "llm_router.client.cli", "--redis-url", redis_url, "backfill",
                    str(source), "--output", str(output), "--batch-queue", queue + ":batch",
                    "--max-in-flight", "5000"]  # fmt: skip
            started = time.monotonic()
            done = await asyncio.to_thread(
                subprocess.run, argv, env=base_env(), capture_output=True, timeout=900
            )
            wall = time.monotonic() - started
            if done.returncode != 0:
                raise SystemExit(f"backfill failed: {done.stderr.decode()[-2000:]}")
        finally:
            for worker in workers:
                worker.stop()
            await forget_keys(redis, [*queue_keys(queue), *queue_keys(queue + ":batch")])
            await redis.aclose()
        rows = [json.loads(line) for line in output.read_text().splitlines()]
        cloud = [r for r in rows if r["model_used"] == HAIKU]
        return {
            "cloud_rows": len(cloud),
            "cost_usd": round(sum(r["cost_usd"] for r in cloud), 9),
            "real_time_calls": sum(1 for r in stub.requests if r.path == "/v1/messages"),
            "batches": len(stub.batches),
            "wall_s": round(wall, 2),
        }
