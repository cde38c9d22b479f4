"""A load driver process for the throughput benchmark, steered by JSON lines on stdin.

``--mode producer``: N coroutines share one RouterClient and route jobs through the queue
(closed loop: each waits for its answer, then enqueues the next).
``--mode ceiling``: the same N coroutines call ``Router.run`` in this process: the chain
with no queue, the most litellm leaves.

Protocol: the driver prints ``{"ready": true}``, then answers each
``{"cmd": "run", "concurrency": N, "warmup": S, "duration": S, "max_jobs": M, "pids": {...}}``
with one JSON line; ``{"cmd": "stop"}`` or end of input ends it. Jobs finishing inside the
measuring window (after the warm-up) count; the CPU time of ``pids`` (and of this process)
is sampled at the window's two ends.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench.common import (
    JOB_TIMEOUT_S,
    PROMPT,
    cpu_sample,
    forget_jobs,
    forget_keys,
    set_offline_env,
    summary,
)
from llm_router.client import RouteFailed, RouterClient, RouteResult, build_request

Call = Callable[[], Awaitable[RouteResult]]

# The protocol owns the real stdout; anything a library prints goes to stderr (the log).
_PROTOCOL = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
sys.stdout = sys.stderr


def reply(message: dict[str, Any]) -> None:
    _PROTOCOL.write(json.dumps(message) + "\n")
    _PROTOCOL.flush()


async def run_load(call: Call, cmd: dict[str, Any]) -> tuple[dict[str, Any], list[RouteResult]]:
    concurrency = int(cmd["concurrency"])
    warmup, duration = float(cmd["warmup"]), float(cmd["duration"])
    max_jobs = int(cmd["max_jobs"])
    pids: dict[str, int] = {**cmd.get("pids", {}), "driver": os.getpid()}
    start = time.monotonic()
    window_start, window_end = start + warmup, start + warmup + duration
    spans: list[tuple[float, float]] = []
    results: list[RouteResult] = []
    errors: list[str] = []
    started = 0
    marks: list[tuple[float, dict[str, float]]] = []

    async def loop() -> None:
        nonlocal started
        while time.monotonic() < window_end and started < max_jobs:
            started += 1
            t0 = time.monotonic()
            try:
                result = await call()
            except RouteFailed as exc:
                results.append(exc.result)
                errors.append(str(exc)[:300])
                await asyncio.sleep(0.01)
                continue
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:300])
                await asyncio.sleep(0.01)
                continue
            spans.append((t0, time.monotonic()))
            results.append(result)

    async def sample() -> None:
        await asyncio.sleep(max(0.0, window_start - time.monotonic()))
        marks.append((time.monotonic(), cpu_sample(pids)))
        await asyncio.sleep(max(0.0, window_end - time.monotonic()))
        marks.append((time.monotonic(), cpu_sample(pids)))

    tasks = [asyncio.create_task(loop()) for _ in range(concurrency)]
    tasks.append(asyncio.create_task(sample()))
    try:
        async with asyncio.timeout(warmup + duration + JOB_TIMEOUT_S + 30):
            await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    (t_a, cpu_a), (t_b, cpu_b) = marks
    window = t_b - t_a
    inside = [(s, e) for s, e in spans if t_a <= e < t_b]
    out = {
        "jobs_per_s": round(len(inside) / window, 2),
        "window_s": round(window, 3),
        "window_jobs": len(inside),
        "completed": len(spans),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "latency_ms": summary([(e - s) * 1000 for s, e in inside]),
        "cpu_pct": {name: round((cpu_b[name] - cpu_a[name]) / window * 100, 1) for name in pids},
    }
    return out, results


async def serve(args: argparse.Namespace) -> None:
    client: RouterClient | None = None
    if args.mode == "ceiling":
        set_offline_env()
        from llm_router.worker import calls
        from llm_router.worker.logs import configure_logging
        from llm_router.worker.router import Router
        from llm_router.worker.settings import Settings

        configure_logging("WARNING", "json")  # as our worker runs in the benchmark
        calls.warm_up()
        router = Router(Settings(chains=json.loads(args.chains)))

        async def call() -> RouteResult:
            return await router.run(build_request(PROMPT))

        for _ in range(3):  # litellm's lazy first-call costs, off the clock
            await call()
    else:
        client = RouterClient(args.redis_url, queue_name=args.queue)

        async def call() -> RouteResult:
            # What client.route() does, with the id kept for clean-up as soon as it exists.
            assert client is not None
            handle = await client.enqueue(PROMPT)
            pending.append(handle.job_id)
            return await handle.result(timeout=JOB_TIMEOUT_S)

    pending: list[str] = []  # job ids whose keys are not deleted yet
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    reply({"ready": True})
    try:
        for _ in range(10_000):
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line.strip():
                break
            cmd = json.loads(line)
            if cmd.get("cmd") != "run":
                break
            out, _ = await run_load(call, cmd)
            if client is not None:
                await forget_jobs(client.redis, pending)
                pending.clear()
            reply(out)
    finally:
        if client is not None:
            if pending:  # stopped mid-run: let jobs in flight land, then delete their keys
                await asyncio.sleep(2.0)
                async with asyncio.timeout(10):
                    await forget_jobs(client.redis, pending)
            await forget_keys(client.redis, [client.inbox.key])
            await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.driver", description=__doc__)
    parser.add_argument("--mode", choices=["producer", "ceiling"], required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--chains", required=True)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
