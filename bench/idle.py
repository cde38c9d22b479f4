"""Idle cost: CPU a ready worker burns with nothing to do, as % of one core.

Three workers idle side by side over the same window, each on a queue of its own: ours
(wake-up BLPOP plus its safety-net poll at the default 0.5 s), plain arq at its defaults
(0.5 s poll) and plain arq polling every 10 ms. CPU = utime + stime from /proc/<pid>/stat.
The Redis server's CPU over the window is shown too (all of its clients, not only ours).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from arq.connections import RedisSettings, create_pool
from redis.asyncio import Redis

from bench.common import (
    ARQ_POLL,
    chains_json,
    cpu_sample,
    forget_jobs,
    forget_keys,
    note,
    queue_keys,
    ratio,
    redis_pid,
    say,
    table,
)
from bench.procs import Managed, probe_arq, probe_ours, start_arq, start_ours, wait_listening
from llm_router.client import RouterClient

VARIANTS = ("ours", "arq_default", "arq_10ms")
FLOOR_PCT = 0.5


@dataclass
class IdleConfig:
    redis_url: str
    seconds: float = 60.0
    settle: float = 3.0


async def run(cfg: IdleConfig, stub_url: str, run_id: str) -> dict[str, Any]:
    chains = chains_json(stub_url)
    channel = f"bench:{run_id}:metrics"
    queues = {v: f"bench:{run_id}:idle:{v}" for v in VARIANTS}
    redis = Redis.from_url(cfg.redis_url)
    pool = await create_pool(RedisSettings.from_dsn(cfg.redis_url))
    client = RouterClient(cfg.redis_url, queue_name=queues["ours"])
    workers: dict[str, Managed] = {}
    job_ids: list[str] = []
    try:
        common: dict[str, Any] = {
            "redis_url": cfg.redis_url,
            "chains": chains,
            "metrics_channel": channel,
        }
        workers["ours"] = start_ours("idle-ours", queue=queues["ours"], **common)
        for v in ("arq_default", "arq_10ms"):
            workers[v] = start_arq(f"idle-{v}", queue=queues[v], poll_delay=ARQ_POLL[v], **common)
        note("idle: waiting for 3 workers (litellm import)...")
        await wait_listening(workers["ours"], redis)
        await probe_ours(workers["ours"], client, job_ids)
        for v in ("arq_default", "arq_10ms"):
            await probe_arq(workers[v], pool, queues[v], job_ids)
        await client.aclose()  # its reply reader would be one more BLPOP on Redis
        await asyncio.sleep(cfg.settle)
        pids = {v: w.pid for v, w in workers.items()}
        rpid = await redis_pid(redis)
        if rpid is not None:
            pids["redis-server"] = rpid
        note(f"idle: measuring {cfg.seconds:.0f}s of idling")
        t0, cpu0 = time.monotonic(), cpu_sample(pids)
        end = t0 + cfg.seconds
        while time.monotonic() < end:
            await asyncio.sleep(min(1.0, max(0.0, end - time.monotonic())))
            for w in workers.values():
                w.check_alive()
        t1, cpu1 = time.monotonic(), cpu_sample(pids)
    finally:
        for worker in workers.values():
            worker.stop()
        await forget_jobs(redis, [j for j in job_ids if j])
        await forget_keys(redis, [k for q in queues.values() for k in queue_keys(q)])
        await forget_keys(redis, [client.inbox.key])
        await client.aclose()
        await pool.aclose()
        await redis.aclose()
    wall = t1 - t0
    cpu_s = {name: round(cpu1[name] - cpu0[name], 3) for name in pids}
    pct = {name: round(cpu_s[name] / wall * 100, 3) for name in pids}
    rows = [[name, cpu_s[name], pct[name]] for name in pids]
    say(f"Idle cost over {wall:.1f} s (CPU seconds and % of one core)")
    say(table(["process", "cpu s", "% core"], rows))
    met = pct["ours"] <= FLOOR_PCT
    say(f"floor ours <= {FLOOR_PCT} % of a core: {'MET' if met else 'MISSED'}")
    return {
        "benchmark": "idle",
        "config": {"seconds": cfg.seconds, "settle": cfg.settle},
        "wall_s": round(wall, 3),
        "cpu_s": cpu_s,
        "pct_core": pct,
        "ratios": {
            "arq_default_over_ours": ratio(pct["arq_default"], pct["ours"]),
            "arq_10ms_over_ours": ratio(pct["arq_10ms"], pct["ours"]),
        },
        "floors": {"ours_le_0_5pct": met},
    }
