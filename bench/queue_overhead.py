"""Queue overhead: enqueue -> result in the producer's hands, minus the chain's own time.

One producer, one job at a time, an instantly answering model. Three workers run side by
side against the same Redis, each a process on a queue of its own:

* ``ours``        our worker (push wake-up, one-script claim, pushed replies), RouterClient;
* ``ours_producer`` the same worker, RouterClient in producer mode (``handover=False``:
                  plain commands, no hand-over to a waiting worker; what an ACL'd producer
                  and the examples do);
* ``arq_10ms``    plain arq, pickle, worker poll 10 ms, ``job.result(poll_delay=0.01)``;
* ``arq_default`` plain arq at its defaults: worker poll 0.5 s, ``job.result()`` poll 0.5 s.

Jobs are measured in interleaved rounds (a block of each variant per round), so a noisy
neighbour on the shared machine hits all variants alike. overhead = total - chain_ms.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from arq.connections import ArqRedis, RedisSettings, create_pool
from redis.asyncio import Redis

from bench.common import (
    ARQ_POLL,
    JOB_TIMEOUT_S,
    PROMPT,
    Measure,
    Samples,
    chains_json,
    forget_jobs,
    forget_keys,
    note,
    queue_keys,
    ratio,
    say,
    shares,
    summary,
    table,
    timed_jobs,
)
from bench.procs import (
    Managed,
    probe_arq,
    probe_ours,
    run_job_arq,
    start_arq,
    start_ours,
    wait_listening,
)
from llm_router.client import RouterClient

VARIANTS = ("ours", "ours_producer", "arq_10ms", "arq_default")
FLOOR_P50_MS = 2.0
FLOOR_P99_MS = 10.0
PINGS_PER_ROUND = 100


@dataclass
class OverheadConfig:
    redis_url: str
    jobs: int = 1000
    jobs_arq_default: int = 200
    warmup: int = 20
    rounds: int = 5


def _ours(client: RouterClient) -> Measure:
    async def measure(ids: list[str]) -> tuple[float, float]:
        t0 = time.perf_counter()
        handle = await client.enqueue(PROMPT)  # what client.route() does, id kept for clean-up
        ids.append(handle.job_id)
        result = await handle.result(timeout=JOB_TIMEOUT_S)
        total = (time.perf_counter() - t0) * 1000
        return total, result.chain_ms

    return measure


def _arq(pool: ArqRedis, queue: str, poll: float | None) -> Measure:
    async def measure(ids: list[str]) -> tuple[float, float]:
        t0 = time.perf_counter()
        result = await run_job_arq(pool, queue, poll, ids)
        total = (time.perf_counter() - t0) * 1000
        if result.get("status") != "ok":
            raise RuntimeError(f"job failed: {result.get('error')}")
        return total, float(result["chain_ms"])

    return measure


async def run(cfg: OverheadConfig, stub_url: str, run_id: str) -> dict[str, Any]:
    chains = chains_json(stub_url)
    channel = f"bench:{run_id}:metrics"
    queues = {v: f"bench:{run_id}:overhead:{v}" for v in VARIANTS}
    redis = Redis.from_url(cfg.redis_url)
    pool = await create_pool(RedisSettings.from_dsn(cfg.redis_url))
    client = RouterClient(cfg.redis_url, queue_name=queues["ours"])
    producer = RouterClient(cfg.redis_url, queue_name=queues["ours_producer"], handover=False)
    warm = Samples()  # probes and warm-up jobs: cleaned up, not reported
    samples = {v: Samples() for v in VARIANTS}
    pings: list[float] = []
    workers: dict[str, Managed] = {}
    try:
        common: dict[str, Any] = {
            "redis_url": cfg.redis_url,
            "chains": chains,
            "metrics_channel": channel,
        }
        workers["ours"] = start_ours("overhead-ours", queue=queues["ours"], **common)
        workers["ours_producer"] = start_ours(
            "overhead-ours-producer", queue=queues["ours_producer"], **common
        )
        for v in ("arq_10ms", "arq_default"):
            workers[v] = start_arq(
                f"overhead-{v}", queue=queues[v], poll_delay=ARQ_POLL[v], **common
            )
        note("queue_overhead: waiting for 4 workers (litellm import)...")
        waited = await wait_listening(workers["ours"], redis)
        await wait_listening(workers["ours_producer"], redis)
        await probe_ours(workers["ours"], client, warm.job_ids)
        await probe_ours(workers["ours_producer"], producer, warm.job_ids)
        for v in ("arq_10ms", "arq_default"):
            await probe_arq(workers[v], pool, queues[v], warm.job_ids)
        note(f"queue_overhead: workers ready (ours listening after {waited:.1f}s); warming up")
        measures: dict[str, Measure] = {"ours": _ours(client), "ours_producer": _ours(producer)}
        for v in ("arq_10ms", "arq_default"):
            measures[v] = _arq(pool, queues[v], ARQ_POLL[v])
        for v in VARIANTS:
            n = cfg.warmup if v != "arq_default" else max(2, cfg.warmup // 4)
            await timed_jobs(measures[v], n, warm, record=False)
        counts = {
            "ours": shares(cfg.jobs, cfg.rounds),
            "ours_producer": shares(cfg.jobs, cfg.rounds),
            "arq_10ms": shares(cfg.jobs, cfg.rounds),
            "arq_default": shares(cfg.jobs_arq_default, cfg.rounds),
        }
        for r in range(cfg.rounds):
            order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
            for v in order:
                await timed_jobs(measures[v], counts[v][r], samples[v], record=True)
            for _ in range(PINGS_PER_ROUND):  # the unit everything above is made of
                t0 = time.perf_counter()
                await redis.ping()
                pings.append((time.perf_counter() - t0) * 1000)
            note(
                f"queue_overhead: round {r + 1}/{cfg.rounds} done "
                + ", ".join(f"{v}={len(samples[v].overhead)}" for v in VARIANTS)
            )
    finally:
        for worker in workers.values():
            worker.stop()
        every = [j for s in [warm, *samples.values()] for j in s.job_ids if j]
        await forget_jobs(redis, every)
        await forget_keys(redis, [k for q in queues.values() for k in queue_keys(q)])
        await forget_keys(redis, [client.inbox.key, producer.inbox.key])
        await client.aclose()
        await producer.aclose()
        await pool.aclose()
        await redis.aclose()
    return _report(cfg, samples, pings)


def _report(cfg: OverheadConfig, samples: dict[str, Samples], pings: list[float]) -> dict[str, Any]:
    variants: dict[str, Any] = {}
    for v in VARIANTS:
        s = samples[v]
        variants[v] = {
            "jobs": len(s.overhead),
            "errors": len(s.errors),
            "first_error": s.errors[0] if s.errors else None,
            "truncated": s.truncated,
            "overhead_ms": summary(s.overhead),
            "total_ms": summary(s.total),
            "chain_ms": summary(s.chain),
        }
    ours = variants["ours"]["overhead_ms"]
    floors = {
        "p50_le_2ms": bool(ours.get("p50", 1e9) <= FLOOR_P50_MS),
        "p99_le_10ms": bool(ours.get("p99", 1e9) <= FLOOR_P99_MS),
        "no_errors": all(variants[v]["errors"] == 0 for v in VARIANTS),
    }
    ratios = {
        f"{v}_p50_over_ours": ratio(variants[v]["overhead_ms"].get("p50", 0.0), ours.get("p50", 0))
        for v in ("ours_producer", "arq_10ms", "arq_default")
    }
    rows = []
    for v in VARIANTS:
        o, t, c = (variants[v][k] for k in ("overhead_ms", "total_ms", "chain_ms"))
        rows.append(
            [
                v,
                variants[v]["jobs"],
                variants[v]["errors"],
                *(o.get(k, float("nan")) for k in ("p50", "p95", "p99", "mean", "max")),
                t.get("p50", float("nan")),
                c.get("p50", float("nan")),
            ]
        )
    ping = summary(pings)
    nan = float("nan")
    stats = [ping.get(k, nan) for k in ("p50", "p95", "p99", "mean", "max")]
    rows.append(["(redis PING rtt)", len(pings), 0, *stats, nan, nan])
    say("Queue overhead (ms): enqueue -> result in hand, minus chain_ms; sequential jobs")
    headers = ["variant", "jobs", "err", "p50", "p95", "p99", "mean", "max"]
    say(table([*headers, "total p50", "chain p50"], rows))
    say(
        f"floor ours p50 <= {FLOOR_P50_MS} ms: {'MET' if floors['p50_le_2ms'] else 'MISSED'}; "
        f"p99 <= {FLOOR_P99_MS} ms: {'MET' if floors['p99_le_10ms'] else 'MISSED'}; "
        + "; ".join(f"{k} = {x}" for k, x in ratios.items())
    )
    return {
        "benchmark": "queue_overhead",
        "config": {
            "jobs": cfg.jobs,
            "jobs_arq_default": cfg.jobs_arq_default,
            "warmup": cfg.warmup,
            "rounds": cfg.rounds,
        },
        "variants": variants,
        "redis_ping_ms": ping,
        "ratios": ratios,
        "floors": floors,
    }
