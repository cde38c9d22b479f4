"""The local model under load and when it hangs: slots and the breaker beside the seed's way.

1. ``breaker``: the local model hangs; 50 sequential jobs through one worker, the
   chain local (deadline 1 s) then Haiku at the stub. The seed's behaviour (no
   breaker: every job waits out the deadline) beside ours (breaker_failures 3),
   with the cloud model alone as the reference. Floor: once open, p50 <= the
   cloud-only p50 + 5 ms.
2. ``capacity``: a local model that serves one request at a time (300 ms each, like
   Ollama with OLLAMA_NUM_PARALLEL=1), deadline 1.5 s, then Haiku; bursts of 20 and
   100 concurrent jobs over 2 workers, with no limit (the seed), with
   max_in_flight 1 and max_wait 4 (the default), and with max_in_flight 1 and a
   max_wait long enough for the burst. Floor: the last is 100 % local, peak 1.

The stub runs in this process (its counters are read directly); the workers are
processes of their own.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from redis.asyncio import Redis

from bench.common import median, note, quantile, queue_keys, say, table
from bench.procs import Managed, start_ours, wait_listening
from llm_router.client import RouterClient
from llm_router.client.protocol import RouteResult
from llm_router_testing.stubs import Behaviour, StubServer

LOCAL = "ollama_chat/qwen2.5:7b"
HAIKU = "anthropic/claude-haiku-4-5-20251001"
KEY = {"api_key": "sk-ant-bench-0123456789"}
SEQUENTIAL_JOBS = 50
BURSTS = (20, 100)


def _chains(url: str, local: dict[str, Any] | None, local_timeout: float) -> str:
    cloud = {"model": HAIKU, "timeout": 5.0, "api_base": url, **KEY}
    chain = [cloud]
    if local is not None:
        chain.insert(0, {"model": LOCAL, "timeout": local_timeout, "api_base": url, **local})
    return json.dumps({"default": chain})


async def _workers(
    redis: Redis, redis_url: str, run_id: str, name: str, chains: str, n: int
) -> tuple[list[Managed], str]:
    queue = f"bench:{run_id}:local:{name}:{uuid.uuid4().hex[:4]}"
    workers = [
        start_ours(
            f"local-{name}-{i}",
            redis_url=redis_url,
            queue=queue,
            chains=chains,
            metrics_channel=f"bench:{run_id}:metrics",
            max_jobs=200,
        )
        for i in range(n)
    ]
    for worker in workers:
        await wait_listening(worker, redis)
    return workers, queue


async def _stop(redis: Redis, workers: list[Managed], queue: str, ids: list[str]) -> None:
    for worker in workers:
        worker.stop()
    per_job = ("arq:result:", "arq:job:", "arq:in-progress:", "arq:retry:")
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        await redis.delete(*(p + j for j in chunk for p in per_job))
    await redis.delete(*queue_keys(queue))


def _latencies(results: list[tuple[RouteResult, float]]) -> dict[str, float]:
    ms = [s * 1000 for _, s in results]
    return {"p50_ms": median(ms), "p95_ms": quantile(ms, 0.95), "n": len(ms)}


async def _sequential(
    client: RouterClient, n: int, ids: list[str]
) -> list[tuple[RouteResult, float]]:
    out = []
    for i in range(n):
        started = time.perf_counter()
        handle = await client.enqueue(f"sequential {i}")
        ids.append(handle.job_id)
        result = await handle.result(timeout=60, raise_on_failure=False)
        out.append((result, time.perf_counter() - started))
    return out


async def _burst(client: RouterClient, n: int, ids: list[str]) -> list[tuple[RouteResult, float]]:
    started = time.perf_counter()
    handles = [await client.enqueue(f"burst {i}") for i in range(n)]
    ids += [h.job_id for h in handles]

    async def one(handle: Any) -> tuple[RouteResult, float]:
        result = await handle.result(timeout=180, raise_on_failure=False)
        return result, time.perf_counter() - started

    return list(await asyncio.gather(*(one(h) for h in handles)))


async def breaker(redis: Redis, redis_url: str, run_id: str) -> dict[str, Any]:
    rows: list[list[object]] = []
    data: dict[str, Any] = {}
    variants = {
        "cloud only": None,
        "seed (no breaker)": {"breaker_failures": 1000},
        "breaker": {"breaker_failures": 3, "breaker_cooldown": 600},
    }
    for name, local in variants.items():
        note(f"local_model: breaker, {name}: {SEQUENTIAL_JOBS} sequential jobs")
        with StubServer() as stub:  # a server of its own: a breaker belongs to its endpoint
            stub.set_behaviour("qwen", Behaviour.HANG)
            chains = _chains(stub.url, local, local_timeout=1.0)
            workers, queue = await _workers(redis, redis_url, run_id, name.split()[0], chains, 1)
            ids: list[str] = []
            try:
                async with RouterClient(redis_url, queue_name=queue) as client:
                    results = await _sequential(client, SEQUENTIAL_JOBS, ids)
            finally:
                await _stop(redis, workers, queue, ids)
        assert all(r.ok for r, _ in results), [r.error for r, _ in results if not r.ok]
        opened = next(
            (i for i, (r, _) in enumerate(results) if r.attempts[0].outcome == "skipped"),
            None,
        )
        phases = {"all": results}
        if opened is not None:
            phases = {"before open": results[:opened], "after open": results[opened:]}
        for phase, part in phases.items():
            stats = _latencies(part)
            skip_ms = [
                r.attempts[0].latency_ms for r, _ in part if r.attempts[0].outcome == "skipped"
            ]
            rows.append(
                [name, phase, stats["n"], round(stats["p50_ms"], 1), round(stats["p95_ms"], 1),
                 max(skip_ms) if skip_ms else "-"]
            )  # fmt: skip
            data[f"{name} / {phase}"] = {**stats, "skip_latency_max_ms": max(skip_ms, default=None)}
    say("1. A hanging local model (deadline 1 s), then Haiku at the stub: 50 sequential jobs")
    say(table(["variant", "jobs", "n", "p50 ms", "p95 ms", "skip attempt max ms"], rows))
    cloud = data["cloud only / all"]["p50_ms"]
    after = data.get("breaker / after open", {}).get("p50_ms", float("inf"))
    met = after <= cloud + 5
    say(
        f"floor: once open, p50 {after:.1f} ms <= cloud only {cloud:.1f} ms + 5: "
        + ("MET" if met else "MISSED")
    )
    return {"variants": data, "floor_met": met}


async def capacity(redis: Redis, redis_url: str, run_id: str) -> dict[str, Any]:
    rows: list[list[object]] = []
    data: dict[str, Any] = {}
    variants: dict[str, dict[str, Any]] = {
        "seed (no limit)": {"breaker_failures": 1000},
        "max_in_flight 1, max_wait 4": {
            "max_in_flight": 1,
            "max_wait": 4,
            "breaker_failures": 1000,
        },
        "max_in_flight 1, max_wait 60": {
            "max_in_flight": 1,
            "max_wait": 60,
            "breaker_failures": 1000,
        },
    }
    floor = True
    with StubServer(ollama_parallel=1, ollama_delay=0.3) as stub:
        for name, local in variants.items():
            chains = _chains(stub.url, local, local_timeout=1.5)
            workers, queue = await _workers(redis, redis_url, run_id, "cap", chains, 2)
            ids: list[str] = []
            try:
                async with RouterClient(redis_url, queue_name=queue) as client:
                    for n in BURSTS:
                        note(f"local_model: capacity, {name}: a burst of {n}")
                        await asyncio.sleep(0.5)
                        stub.reset_peak()
                        results = await _burst(client, n, ids)
                        stats = _latencies(results)
                        local_share = sum(r.model_used == LOCAL for r, _ in results) / n
                        cloud_calls = sum(
                            a.model == HAIKU and a.outcome != "skipped"
                            for r, _ in results
                            for a in r.attempts
                        )
                        peak = stub.peak_in_flight
                        rows.append(
                            [name, n, f"{local_share:.0%}", cloud_calls, round(stats["p50_ms"]),
                             round(stats["p95_ms"]), peak]
                        )  # fmt: skip
                        data[f"{name} / {n}"] = {
                            **stats, "local_share": local_share, "cloud_calls": cloud_calls,
                            "peak_in_flight": peak, "ok": sum(r.ok for r, _ in results),
                        }  # fmt: skip
                        if name.endswith("max_wait 60"):
                            floor = floor and local_share == 1.0 and peak == 1
            finally:
                await _stop(redis, workers, queue, ids)
    say("2. A one-at-a-time local model (300 ms an answer, deadline 1.5 s), then Haiku: 2 workers")
    say(
        table(
            ["variant", "burst", "local", "cloud calls", "p50 ms", "p95 ms", "peak at model"], rows
        )
    )
    say(
        "floor: max_in_flight 1 with a long max_wait is 100 % local, peak 1: "
        + ("MET" if floor else "MISSED")
    )
    return {"variants": data, "floor_met": floor}


async def run(redis_url: str, run_id: str) -> dict[str, Any]:
    redis = Redis.from_url(redis_url)
    try:
        first = await breaker(redis, redis_url, run_id)
        say()
        second = await capacity(redis, redis_url, run_id)
    finally:
        await redis.aclose()
    return {
        "benchmark": "local_model",
        "breaker": first,
        "capacity": second,
        "floors": {"breaker_p50": first["floor_met"], "capacity_all_local": second["floor_met"]},
    }
