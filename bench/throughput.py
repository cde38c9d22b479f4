"""Throughput: jobs/s through our worker(s), beside the chain called in-process.

Variants, interleaved per round (the order rotates) and summarised by their medians:

* ``ceiling_1``  one process runs ``Router.run`` with N concurrent tasks (no queue);
* ``ours_1``     one worker process (max_jobs M), N closed-loop producers (RouterClient);
* ``ours_2``     two worker processes on one queue, the same N producers;
* ``ceiling_2``  two in-process ceiling drivers with N/2 tasks each.

The stub model, the producers and the ceiling drivers are processes of their own; the CPU
of each process (and of Redis) over the measuring window is reported, so a saturated
producer shows (``--producers 2`` splits the N coroutines over two processes).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from bench.common import (
    JOB_TIMEOUT_S,
    chains_json,
    forget_keys,
    median,
    note,
    queue_keys,
    ratio,
    redis_pid,
    say,
    table,
)
from bench.procs import Managed, start_driver, start_ours, wait_driver_ready, wait_listening

VARIANTS = ("ceiling_1", "ours_1", "ours_2", "ceiling_2")
FLOOR_RATIO = 0.8
PRODUCER_BUSY_PCT = 80.0


@dataclass
class ThroughputConfig:
    redis_url: str
    concurrency: int = 50
    producers: int = 1
    max_jobs: int = 50
    duration: float = 10.0
    warmup: float = 2.0
    rounds: int = 3


@dataclass
class Setup:
    workers: dict[str, Managed]
    producers: dict[str, list[Managed]]  # by queue: "q1" (one worker), "q2" (two workers)
    ceilings: list[Managed]
    stub_pid: int
    redis_pid: int | None


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def _drive(drivers: list[Managed], cfg: ThroughputConfig, pids: dict[str, int]) -> Any:
    """Send one run command to each driver at once; the first samples ``pids``."""
    for i, (driver, n) in enumerate(
        zip(drivers, _split(cfg.concurrency, len(drivers)), strict=True)
    ):
        driver.send(
            {
                "cmd": "run",
                "concurrency": n,
                "warmup": cfg.warmup,
                "duration": cfg.duration,
                "max_jobs": int(cfg.duration * 2000) + 10_000,
                "pids": pids if i == 0 else {},
            }
        )
    timeout = cfg.warmup + cfg.duration + JOB_TIMEOUT_S + 60
    lines = await asyncio.gather(*(asyncio.to_thread(d.read_line, timeout) for d in drivers))
    return [json.loads(line) for line in lines]


def _merge(variant: str, outs: list[dict[str, Any]], worker_names: list[str]) -> dict[str, Any]:
    jobs_per_s = round(sum(o["jobs_per_s"] for o in outs), 2)
    cpu = dict(outs[0]["cpu_pct"])
    drivers = [o["cpu_pct"]["driver"] for o in outs]
    cpu.pop("driver", None)
    busy = [cpu[w] for w in worker_names] if worker_names else drivers
    cpu_ms_per_job = round(sum(busy) / 100 / jobs_per_s * 1000, 3) if jobs_per_s else float("nan")
    return {
        "variant": variant,
        "jobs_per_s": jobs_per_s,
        "window_jobs": sum(o["window_jobs"] for o in outs),
        "errors": sum(o["errors"] for o in outs),
        "first_error": next((o["first_error"] for o in outs if o["first_error"]), None),
        "latency_ms_driver0": outs[0]["latency_ms"],
        "cpu_pct": cpu,
        "driver_cpu_pct": drivers,
        "busy_cpu_ms_per_job": cpu_ms_per_job,
    }


async def _round(setup: Setup, cfg: ThroughputConfig, variant: str) -> dict[str, Any]:
    pids = {"stub": setup.stub_pid}
    if setup.redis_pid is not None:
        pids["redis"] = setup.redis_pid
    if variant.startswith("ceiling"):
        drivers = setup.ceilings[: int(variant[-1])]
        return _merge(variant, await _drive(drivers, cfg, pids), [])
    names = ["w1"] if variant == "ours_1" else ["w2a", "w2b"]
    pids |= {n: setup.workers[n].pid for n in names}
    drivers = setup.producers["q1" if variant == "ours_1" else "q2"]
    return _merge(variant, await _drive(drivers, cfg, pids), names)


async def run(cfg: ThroughputConfig, stub_url: str, stub_pid: int, run_id: str) -> dict[str, Any]:
    chains = chains_json(stub_url)
    channel = f"bench:{run_id}:metrics"
    queues = {"q1": f"bench:{run_id}:tput:one", "q2": f"bench:{run_id}:tput:two"}
    redis = Redis.from_url(cfg.redis_url)
    started: list[Managed] = []
    rounds: list[dict[str, Any]] = []
    try:
        workers = {
            name: start_ours(
                f"tput-{name}",
                redis_url=cfg.redis_url,
                queue=queues[q],
                chains=chains,
                metrics_channel=channel,
                max_jobs=cfg.max_jobs,
            )
            for name, q in (("w1", "q1"), ("w2a", "q2"), ("w2b", "q2"))
        }
        ceilings = [
            start_driver(
                f"tput-ceiling{i}", "ceiling", redis_url=cfg.redis_url, queue="-", chains=chains
            )
            for i in range(2)
        ]
        producers = {
            q: [
                start_driver(
                    f"tput-producer-{q}-{i}",
                    "producer",
                    redis_url=cfg.redis_url,
                    queue=queues[q],
                    chains=chains,
                )
                for i in range(cfg.producers)
            ]
            for q in queues
        }
        started = [*workers.values(), *ceilings, *(p for ps in producers.values() for p in ps)]
        note("throughput: waiting for 3 workers and 2 ceiling drivers (litellm import)...")
        for w in workers.values():
            await wait_listening(w, redis)
        for d in [*ceilings, *(p for ps in producers.values() for p in ps)]:
            await wait_driver_ready(d)
        setup = Setup(workers, producers, ceilings, stub_pid, await redis_pid(redis))
        for r in range(cfg.rounds):
            order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
            for variant in order:
                out = await _round(setup, cfg, variant)
                out["round"] = r + 1
                rounds.append(out)
                note(
                    f"throughput: round {r + 1}/{cfg.rounds} {variant}: {out['jobs_per_s']} jobs/s"
                )
                for w in workers.values():
                    w.check_alive()
    finally:
        for proc in reversed(started):
            proc.stop()
        await forget_keys(redis, [k for q in queues.values() for k in queue_keys(q)])
        await redis.aclose()
    return _report(cfg, rounds)


def _report(cfg: ThroughputConfig, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    med: dict[str, dict[str, Any]] = {}
    for v in VARIANTS:
        mine = [r for r in rounds if r["variant"] == v]
        cpu_names = sorted({k for r in mine for k in r["cpu_pct"]})
        med[v] = {
            "jobs_per_s": median(r["jobs_per_s"] for r in mine),
            "rounds": [r["jobs_per_s"] for r in mine],
            "errors": sum(r["errors"] for r in mine),
            "busy_cpu_ms_per_job": median(r["busy_cpu_ms_per_job"] for r in mine),
            "cpu_pct": {
                k: median(r["cpu_pct"].get(k, float("nan")) for r in mine) for k in cpu_names
            },
            "driver_cpu_pct_max": median(max(r["driver_cpu_pct"]) for r in mine),
            "latency_ms_p50": median(
                r["latency_ms_driver0"].get("p50", float("nan")) for r in mine
            ),
            "latency_ms_p99": median(
                r["latency_ms_driver0"].get("p99", float("nan")) for r in mine
            ),
        }
    ratios = {
        "ours_1_over_ceiling_1": ratio(med["ours_1"]["jobs_per_s"], med["ceiling_1"]["jobs_per_s"]),
        "ours_2_over_ceiling_2": ratio(med["ours_2"]["jobs_per_s"], med["ceiling_2"]["jobs_per_s"]),
        "ours_2_over_ours_1": ratio(med["ours_2"]["jobs_per_s"], med["ours_1"]["jobs_per_s"]),
        "cpu_ms_per_job_ceiling_1_over_ours_1": ratio(
            med["ceiling_1"]["busy_cpu_ms_per_job"], med["ours_1"]["busy_cpu_ms_per_job"]
        ),
        "ceiling_2_over_ceiling_1": ratio(
            med["ceiling_2"]["jobs_per_s"], med["ceiling_1"]["jobs_per_s"]
        ),
    }
    producer_busy = max(med[v]["driver_cpu_pct_max"] for v in ("ours_1", "ours_2"))
    floors = {
        "ours_1_ge_80pct_of_ceiling": bool(ratios["ours_1_over_ceiling_1"] >= FLOOR_RATIO),
        "producers_not_saturated": bool(producer_busy < PRODUCER_BUSY_PCT),
        "no_errors": all(med[v]["errors"] == 0 for v in VARIANTS),
    }
    rows = []
    for v in VARIANTS:
        m = med[v]
        workers = [k for k in m["cpu_pct"] if k.startswith("w")]
        rows.append(
            [
                v,
                m["jobs_per_s"],
                " ".join(f"{x:.0f}" for x in m["rounds"]),
                ratio(m["jobs_per_s"], med["ceiling_1"]["jobs_per_s"]),
                m["busy_cpu_ms_per_job"],
                "+".join(f"{m['cpu_pct'][w]:.0f}" for w in workers) or "-",
                m["driver_cpu_pct_max"],
                m["cpu_pct"].get("stub", float("nan")),
                m["cpu_pct"].get("redis", float("nan")),
                m["latency_ms_p50"],
                m["errors"],
            ]
        )
    say(
        f"Throughput (jobs/s), N={cfg.concurrency} concurrent, {cfg.producers} producer "
        f"process(es), max_jobs={cfg.max_jobs}, {cfg.duration:.0f} s windows, medians of "
        f"{cfg.rounds} round(s); CPU columns in % of one core"
    )
    headers = ["variant", "jobs/s", "rounds", "/ceil_1", "busy ms/job", "worker %"]
    headers += ["driver %", "stub %", "redis %", "lat p50", "err"]
    say(table(headers, rows))
    met = "MET" if floors["ours_1_ge_80pct_of_ceiling"] else "MISSED"
    busy = "not the bottleneck" if floors["producers_not_saturated"] else "MAY BE THE BOTTLENECK"
    say(
        f"floor ours_1 >= {FLOOR_RATIO:.0%} of ceiling_1: {met} "
        f"({ratios['ours_1_over_ceiling_1']}); "
        f"ours_2/ceiling_2 = {ratios['ours_2_over_ceiling_2']}; "
        f"busiest producer {producer_busy:.0f} % of a core ({busy})"
    )
    return {
        "benchmark": "throughput",
        "config": {
            "concurrency": cfg.concurrency,
            "producers": cfg.producers,
            "max_jobs": cfg.max_jobs,
            "duration": cfg.duration,
            "warmup": cfg.warmup,
            "rounds": cfg.rounds,
        },
        "variants": med,
        "ratios": ratios,
        "floors": floors,
        "rounds": rounds,
    }
