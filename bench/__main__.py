"""Run the fast-path benchmarks: ``.venv/bin/python -m bench [--quick] [names...]``."""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import subprocess
import sys
from importlib.metadata import version
from types import FrameType
from typing import Any

from redis.asyncio import Redis

from bench import (
    backfill,
    batches,
    cache,
    cloud,
    hostile,
    idle,
    local_model,
    queue_overhead,
    real_model,
    throughput,
    tokens,
)
from bench.common import DEFAULT_REDIS_URL, REPO_ROOT, emit, new_run_id, note, say
from bench.procs import start_stub, stop_all

NAMES = (
    "queue_overhead",
    "throughput",
    "idle",
    "hostile",
    "local_model",
    "backfill",
    "cloud",
    "tokens",
    "cache",
    "batches",
    "real_model",
)
#: Not in a run without names: they need the real-model group.
OPT_IN = ("real_model",)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("names", nargs="*", help=f"benchmarks to run: {', '.join(NAMES)} (all)")
    p.add_argument("--quick", action="store_true", help="a short smoke run (small counts)")
    p.add_argument("--redis-url", default=DEFAULT_REDIS_URL, help="default: %(default)s")
    g = p.add_argument_group("queue_overhead")
    g.add_argument("--jobs", type=int, help="sequential jobs for ours and arq_10ms (1000)")
    g.add_argument("--jobs-arq-default", type=int, help="jobs for arq at defaults (200)")
    g.add_argument("--warmup-jobs", type=int, help="warm-up jobs per variant (20)")
    g.add_argument("--overhead-rounds", type=int, help="interleaved rounds (5)")
    g = p.add_argument_group("throughput")
    g.add_argument("-n", "--concurrency", type=int, default=50, help="producers N (%(default)s)")
    g.add_argument("--producers", type=int, default=1, help="producer processes (%(default)s)")
    g.add_argument("--max-jobs", type=int, default=50, help="worker max_jobs (%(default)s)")
    g.add_argument("--duration", type=float, help="measuring window per variant, s (10)")
    g.add_argument("--tput-warmup", type=float, help="warm-up before each window, s (2)")
    g.add_argument("--tput-rounds", type=int, help="interleaved rounds (3)")
    g = p.add_argument_group("idle")
    g.add_argument("--idle-seconds", type=float, help="idle window, s (60)")
    g = p.add_argument_group("backfill (also -n, --max-jobs, --duration, --tput-warmup)")
    g.add_argument("--rows", type=int, help="rows of the large backfill (100000)")
    g.add_argument("--rss-rows", type=int, help="rows of the small backfill, for peak RSS (10000)")
    g.add_argument("--client-rows", type=int, help="sequential RouterClient enqueues (5000)")
    g.add_argument("--rounds", type=int, help="rounds of the enqueue-rate comparison (3)")
    g.add_argument("--e2e-rounds", type=int, help="backfill command runs per row count (1)")
    g = p.add_argument_group("cloud")
    g.add_argument("--retry-jobs", type=int, help="jobs per retries variant (200)")
    g = p.add_argument_group("cache")
    g.add_argument("--cache-jobs", type=int, help="sequential measured jobs per variant (500)")
    g = p.add_argument_group("batches")
    g.add_argument("--batch-rows", type=int, help="backfill rows, half to the cloud (2000)")
    g.add_argument(
        "--batch-seconds", type=float, default=2.0, help="the stub's batch time (%(default)s)"
    )
    g = p.add_argument_group("real_model")
    g.add_argument("--real-jobs", type=int, help="sequential jobs per case (30)")
    g.add_argument(
        "--retry-concurrency", type=int, default=20, help="retries producers (%(default)s)"
    )
    g.add_argument("--budget-jobs", type=int, help="jobs per budget setting (300)")
    g.add_argument(
        "--budget-concurrency", type=int, default=40, help="budget producers (%(default)s)"
    )
    g.add_argument(
        "--budget-max-jobs",
        type=int,
        default=20,
        help="max_jobs of each of the 2 budget workers (%(default)s)",
    )
    g.add_argument(
        "--budget-usd",
        type=float,
        default=0.002,
        help="the chain's budget, USD a day (%(default)s)",
    )
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in NAMES]
    if unknown:
        p.error(f"unknown benchmark {unknown[0]!r} (choose from {', '.join(NAMES)})")
    quick = args.quick

    def pick(value: Any, full: Any, short: Any) -> Any:
        return value if value is not None else (short if quick else full)

    args.jobs = pick(args.jobs, 1000, 200)
    args.jobs_arq_default = pick(args.jobs_arq_default, 200, 10)
    args.warmup_jobs = pick(args.warmup_jobs, 20, 10)
    args.overhead_rounds = pick(args.overhead_rounds, 5, 2)
    args.duration = pick(args.duration, 10.0, 3.0)
    args.tput_warmup = pick(args.tput_warmup, 2.0, 1.0)
    args.tput_rounds = pick(args.tput_rounds, 3, 1)
    args.idle_seconds = pick(args.idle_seconds, 60.0, 10.0)
    args.rows = pick(args.rows, 100_000, 20_000)
    args.rss_rows = pick(args.rss_rows, 10_000, 5_000)
    args.client_rows = pick(args.client_rows, 5_000, 2_000)
    args.rounds = pick(args.rounds, 3, 1)
    args.e2e_rounds = pick(args.e2e_rounds, 1, 1)
    args.retry_jobs = pick(args.retry_jobs, 200, 60)
    args.budget_jobs = pick(args.budget_jobs, 300, 100)
    args.real_jobs = pick(args.real_jobs, 30, 5)
    args.cache_jobs = pick(args.cache_jobs, 500, 100)
    args.batch_rows = pick(args.batch_rows, 2000, 400)
    counts = [args.jobs, args.jobs_arq_default, args.overhead_rounds, args.concurrency]
    counts += [args.rows, args.rss_rows, args.client_rows, args.rounds, args.e2e_rounds]
    counts += [args.retry_jobs, args.retry_concurrency, args.budget_jobs]
    counts += [args.budget_concurrency, args.budget_max_jobs, args.real_jobs, args.cache_jobs]
    counts += [args.batch_rows]
    if min(counts) < 1:
        p.error("counts must be at least 1")
    if not 0 < args.budget_usd < 1e6:
        p.error("--budget-usd must be above 0 (and below 1e6)")
    if args.producers < 1 or args.producers > args.concurrency:
        p.error("--producers must be between 1 and N")
    return args


def _git() -> dict[str, Any]:
    """The commit measured, and whether the measured sources differ from it (read-only git)."""

    def git(*argv: str) -> str:
        done = subprocess.run(
            ["git", *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        return done.stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--", "client", "worker")
        return {"commit": git("rev-parse", "--short", "HEAD"), "sources_dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "sources_dirty": None}


def _environment() -> dict[str, Any]:
    return {
        **_git(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "litellm": version("litellm"),
        "arq": version("arq"),
        "redis_py": version("redis"),
    }


async def main_async(args: argparse.Namespace) -> int:
    names = args.names or [n for n in NAMES if n not in OPT_IN]
    run_id = new_run_id()
    redis = Redis.from_url(args.redis_url, socket_connect_timeout=3)
    try:
        info = await redis.info("server")
    finally:
        await redis.aclose()
    env = {**_environment(), "redis_server": info.get("redis_version")}
    note(f"run {run_id}: {', '.join(names)} against {args.redis_url} ({env})")
    stub, stub_url = start_stub()
    floors: dict[str, Any] = {}
    try:
        for name in names:
            say()
            data: dict[str, Any]
            if name == "queue_overhead":
                cfg_o = queue_overhead.OverheadConfig(
                    args.redis_url,
                    jobs=args.jobs,
                    jobs_arq_default=args.jobs_arq_default,
                    warmup=args.warmup_jobs,
                    rounds=args.overhead_rounds,
                )
                data = await queue_overhead.run(cfg_o, stub_url, run_id)
            elif name == "throughput":
                cfg_t = throughput.ThroughputConfig(
                    args.redis_url,
                    concurrency=args.concurrency,
                    producers=args.producers,
                    max_jobs=args.max_jobs,
                    duration=args.duration,
                    warmup=args.tput_warmup,
                    rounds=args.tput_rounds,
                )
                data = await throughput.run(cfg_t, stub_url, stub.pid, run_id)
            elif name == "idle":
                cfg_i = idle.IdleConfig(args.redis_url, seconds=args.idle_seconds)
                data = await idle.run(cfg_i, stub_url, run_id)
            elif name == "hostile":
                data = await hostile.run(stub_url, run_id)
            elif name == "backfill":
                cfg_b = backfill.BackfillConfig(
                    args.redis_url,
                    rows=args.rows,
                    rss_rows=args.rss_rows,
                    client_rows=args.client_rows,
                    rounds=args.rounds,
                    e2e_rounds=args.e2e_rounds,
                    concurrency=args.concurrency,
                    max_jobs=args.max_jobs,
                    duration=args.duration,
                    warmup=args.tput_warmup,
                )
                data = await backfill.run(cfg_b, stub_url, stub.pid, run_id)
            elif name == "cloud":
                cfg_c = cloud.CloudConfig(
                    args.redis_url,
                    retry_jobs=args.retry_jobs,
                    retry_concurrency=args.retry_concurrency,
                    budget_jobs=args.budget_jobs,
                    budget_concurrency=args.budget_concurrency,
                    budget_max_jobs=args.budget_max_jobs,
                    budget_usd=args.budget_usd,
                )
                data = await cloud.run(cfg_c, stub_url, run_id)
            elif name == "tokens":
                data = tokens.run()
            elif name == "cache":
                cfg_k = cache.CacheConfig(
                    args.redis_url,
                    jobs=args.cache_jobs,
                    warmup=args.warmup_jobs,
                    rounds=args.overhead_rounds,
                )
                data = await cache.run(cfg_k, stub_url, run_id)
            elif name == "batches":
                data = await batches.run(
                    args.redis_url, run_id, args.batch_rows, args.batch_seconds
                )
            elif name == "real_model":
                data = await real_model.run(args.redis_url, stub_url, run_id, args.real_jobs)
            else:
                data = await local_model.run(args.redis_url, run_id)
            data |= {"run_id": run_id, "quick": args.quick, "environment": env}
            emit(name, data)
            floors[name] = data["floors"]
    finally:
        stub.stop()
    if len(names) > 1:
        say()
        emit(
            "summary",
            {"benchmark": "summary", "run_id": run_id, "quick": args.quick, "floors": floors},
        )
    return 0


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return asyncio.run(main_async(args))
    except KeyboardInterrupt:
        note("interrupted: stopping every process this run started")
        return 130
    finally:
        stop_all()


if __name__ == "__main__":
    sys.exit(main())
