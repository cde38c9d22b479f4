"""Where a job's time goes: our worker in-process, timestamped at each step, optionally cProfiled.

``python -m bench.profile_worker [--jobs 500] [--concurrency 1] [--cprofile]``

The worker is built exactly as ``llm-router-worker`` builds it (``create_worker``), in this
process, with wrappers that note CLOCK_MONOTONIC at each step of a job; a producer process
(``python -m bench.profile_worker producer ...``) notes the client's side on the same clock.
The report gives each step's median / p95 / p99 in ms. With ``--cprofile`` a second pass
runs under cProfile and prints the top functions of the worker process.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import json
import pstats
import sys
import time
from collections import Counter, defaultdict
from typing import Any

from bench.common import (
    DEFAULT_REDIS_URL,
    JOB_TIMEOUT_S,
    PROMPT,
    PYTHON,
    REPO_ROOT,
    base_env,
    chains_json,
    forget_jobs,
    forget_keys,
    new_run_id,
    quantile,
    queue_keys,
    set_offline_env,
    table,
)
from bench.profstats import by_package, package_table, thread_cpu, thread_delta, top_functions

Stamps = dict[str, dict[str, float]]  # job id -> step -> monotonic time


# ---------------------------------------------------------------- producer side


async def produce(args: argparse.Namespace) -> None:
    """Sequential (or N-concurrent) jobs; one JSON line of client-side stamps per job."""
    from llm_router.client import RouterClient
    from llm_router.client.protocol import RouteResult
    from llm_router.client.replies import ReplyInbox

    delivered: dict[str, float] = {}
    original = ReplyInbox._deliver

    def deliver(self: ReplyInbox, result: RouteResult) -> None:
        if result.job_id:
            delivered[result.job_id] = time.monotonic()
        original(self, result)

    ReplyInbox._deliver = deliver  # type: ignore[method-assign]
    rows: list[dict[str, Any]] = []
    async with RouterClient(args.redis_url, queue_name=args.queue) as client:
        remaining = args.jobs + args.warmup

        async def loop() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                t0 = time.monotonic()
                handle = await client.enqueue(PROMPT)
                t_enq = time.monotonic()
                result = await handle.result(timeout=JOB_TIMEOUT_S)
                t_res = time.monotonic()
                rows.append(
                    {
                        "warmup": len(rows) < args.warmup,
                        "job_id": handle.job_id,
                        "t0": t0,
                        "enqueued": t_enq,
                        "delivered": delivered.pop(handle.job_id, t_res),
                        "in_hand": t_res,
                        "chain_ms": result.chain_ms,
                    }
                )

        async with asyncio.timeout(args.jobs * 2 + 120):
            await asyncio.gather(*(loop() for _ in range(args.concurrency)))
    for row in rows:
        print(json.dumps(row), flush=True)


# ---------------------------------------------------------------- worker side


_STAMPS: Stamps = defaultdict(dict)
_TOKENS: list[float] = []
#: Wall ms of each litellm ``async_success_handler`` (its logging, run after the call returns).
_LITELLM_LOGGING: list[float] = []
#: Round trips the worker makes to Redis, by command (a script by its name, a pipeline whole).
_REDIS_CALLS: Counter[str] = Counter()
_INSTRUMENTED: list[bool] = []


def instrument() -> None:
    """Wrap the worker's steps (once) so each notes when it began or ended, per job id."""
    if _INSTRUMENTED:
        return
    _INSTRUMENTED.append(True)
    stamps = _STAMPS
    from llm_router.worker import jobs
    from llm_router.worker.daemon import RouterWorker
    from llm_router.worker.metrics import Metrics
    from llm_router.worker.router import Router

    current_poll: list[float] = [0.0]

    def note(job_id: str | None, step: str) -> None:
        if job_id:
            stamps[job_id][step] = time.monotonic()

    poll_iteration = RouterWorker._poll_iteration

    async def _poll_iteration(self: RouterWorker) -> None:
        current_poll[0] = time.monotonic()
        await poll_iteration(self)

    start = RouterWorker._start

    async def _start(self: RouterWorker, job_id: str, score: int) -> None:
        stamps[job_id]["poll_began"] = current_poll[0]
        note(job_id, "claimed")
        await start(self, job_id, score)

    route = jobs.route

    async def route_wrapped(ctx: dict[str, Any], *a: Any, **k: Any) -> dict[str, Any]:
        note(ctx["job_id"], "route_began")
        out = await route(ctx, *a, **k)
        note(ctx["job_id"], "route_ended")
        return out

    walk = Router._walk

    async def _walk(self: Router, request: Any, job_id: str | None, bound: Any) -> Any:
        note(job_id, "chain_began")
        out = await walk(self, request, job_id, bound)
        note(job_id, "chain_ended")
        return out

    record = Metrics.record

    async def record_wrapped(self: Metrics, result: Any) -> Any:
        note(result.job_id, "metrics_began")
        out = await record(self, result)
        note(result.job_id, "metrics_ended")
        return out

    finish = RouterWorker.finish_job

    async def finish_job(self: RouterWorker, job_id: str, *a: Any, **k: Any) -> None:
        note(job_id, "finish_began")
        await finish(self, job_id, *a, **k)
        note(job_id, "finish_ended")

    from litellm.litellm_core_utils.litellm_logging import Logging

    success = Logging.async_success_handler

    async def async_success_handler(self: Any, *a: Any, **k: Any) -> Any:
        t0 = time.monotonic()
        try:
            return await success(self, *a, **k)
        finally:
            _LITELLM_LOGGING.append((time.monotonic() - t0) * 1000)

    Logging.async_success_handler = async_success_handler  # type: ignore[method-assign]
    count_redis_round_trips()
    RouterWorker._poll_iteration = _poll_iteration  # type: ignore[method-assign]
    RouterWorker._start = _start  # type: ignore[method-assign]
    RouterWorker.finish_job = finish_job  # type: ignore[method-assign]
    Router._walk = _walk  # type: ignore[method-assign]
    Metrics.record = record_wrapped  # type: ignore[method-assign]
    jobs.route = route_wrapped


class Pass:
    """What one pass measured: per-job rows, the profile, CPU per thread, jobs run."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.stats: pstats.Stats | None = None
        self.threads: dict[str, float] = {}
        self.jobs = 0
        self.wall = 0.0
        self.redis_calls: Counter[str] = Counter()


def _settings(args: argparse.Namespace, stub_url: str, queue: str) -> Any:
    from llm_router.worker import calls
    from llm_router.worker.logs import configure_logging
    from llm_router.worker.settings import Settings

    configure_logging("WARNING", "json")  # as the benchmark runs our worker
    calls.warm_up()
    return Settings(
        redis_url=args.redis_url,
        queue_name=queue,
        chains=json.loads(chains_json(stub_url)),
        metrics_channel=f"{queue}:metrics",
        max_jobs=args.max_jobs,
        log_level="WARNING",
    )


def count_redis_round_trips() -> None:
    """Count each command (scripts named) and each pipeline the worker process sends."""
    from redis.asyncio.client import Pipeline, Redis

    from llm_router.worker import daemon, metrics

    scripts = {
        hashlib.sha1(text.encode()).hexdigest(): name
        for name, text in (
            ("claim", daemon._CLAIM_LUA),
            ("renew", daemon._RENEW_LUA),
            ("finish", daemon._FINISH_LUA),
            ("metrics", metrics._RECORD_LUA),
        )
    }
    execute_command = Redis.execute_command
    execute = Pipeline.execute

    async def counted(self: Redis, *args: Any, **options: Any) -> Any:
        name = str(args[0]).upper()
        if name == "EVALSHA" and len(args) > 1:
            name = "EVALSHA " + scripts.get(str(args[1]), "?")
        _REDIS_CALLS[name] += 1
        return await execute_command(self, *args, **options)  # type: ignore[no-untyped-call]

    async def counted_pipeline(self: Pipeline, raise_on_error: bool = True) -> Any:
        names = ",".join(str(c[0][0]).upper() for c in self.command_stack)
        _REDIS_CALLS[f"PIPELINE {names}"] += 1
        return await execute(self, raise_on_error)

    Redis.execute_command = counted  # type: ignore[method-assign]
    Pipeline.execute = counted_pipeline  # type: ignore[method-assign]


async def work(args: argparse.Namespace, stub_url: str, *, profile: bool) -> Pass:
    """The worker in this process (as ``create_worker`` builds it), the producer in another."""
    from arq.connections import create_pool

    from llm_router.worker import jobs

    queue = f"bench:{new_run_id()}:profile"
    settings = _settings(args, stub_url, queue)
    _STAMPS.clear()
    _TOKENS.clear()
    _LITELLM_LOGGING.clear()
    _REDIS_CALLS.clear()
    stamps, tokens = _STAMPS, _TOKENS
    instrument()
    worker = jobs.create_worker(settings, handle_signals=False)
    worker._pool = await create_pool(
        worker.redis_settings,
        job_serializer=jobs.serialize,
        job_deserializer=jobs.deserialize,
        default_queue_name=queue,
    )
    pool = worker._pool
    blpop = pool.blpop

    async def blpop_noted(*a: Any, **k: Any) -> Any:
        out = await blpop(*a, **k)  # type: ignore[misc]
        if out is not None:
            tokens.append(time.monotonic())
        return out

    pool.blpop = blpop_noted  # type: ignore[method-assign]
    running = asyncio.create_task(worker.async_run())
    argv = [PYTHON, "-m", "bench.profile_worker", "producer", "--redis-url", args.redis_url]
    argv += ["--queue", queue, "--jobs", str(args.jobs), "--concurrency", str(args.concurrency)]
    argv += ["--warmup", str(args.warmup)]
    result = Pass()
    producer = await asyncio.create_subprocess_exec(
        *argv, env=base_env(), cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE
    )
    profiler = cProfile.Profile(time.thread_time) if profile else None
    out = b""
    try:
        before, t0 = thread_cpu(), time.monotonic()
        if profiler is not None:
            profiler.enable()
        async with asyncio.timeout(args.jobs * 2 + 180):
            out, _ = await producer.communicate()
        if profiler is not None:
            profiler.disable()
        result.wall = time.monotonic() - t0
        result.threads = thread_delta(before, thread_cpu())
        result.redis_calls = Counter(_REDIS_CALLS)
    finally:
        if producer.returncode is None:
            producer.terminate()
            await producer.wait()
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        rows = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
        ids = [r["job_id"] for r in rows]
        await forget_jobs(pool, ids)
        rows = [r for r in rows if not r["warmup"]]
        await forget_keys(pool, queue_keys(queue))
        await worker.close()
    for row in rows:
        row.update(stamps.get(row["job_id"], {}))
        earlier = [t for t in tokens if t <= row.get("poll_began", 0.0)]
        row["token"] = earlier[-1] if earlier else row.get("poll_began", row["enqueued"])
    result.rows, result.jobs = rows, args.jobs + args.warmup
    if profiler is not None:
        result.stats = pstats.Stats(profiler)
    return result


async def ceiling(args: argparse.Namespace, stub_url: str, *, profile: bool) -> Pass:
    """The same chain in-process, no queue: ``Router.run`` from N concurrent tasks."""
    from llm_router.client import build_request
    from llm_router.worker.router import Router

    router = Router(_settings(args, stub_url, "unused"))
    remaining = args.jobs + args.warmup

    async def loop() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await router.run(build_request(PROMPT))

    result = Pass()
    profiler = cProfile.Profile(time.thread_time) if profile else None
    before, t0 = thread_cpu(), time.monotonic()
    if profiler is not None:
        profiler.enable()
    async with asyncio.timeout(args.jobs * 2 + 120):
        await asyncio.gather(*(loop() for _ in range(args.concurrency)))
    if profiler is not None:
        profiler.disable()
        result.stats = pstats.Stats(profiler)
    result.wall = time.monotonic() - t0
    result.threads = thread_delta(before, thread_cpu())
    result.jobs = args.jobs + args.warmup
    return result


STEPS: list[tuple[str, str, str]] = [
    ("enqueue (client script)", "t0", "enqueued"),
    ("enqueued -> worker has token", "enqueued", "token"),
    ("token -> poll begins", "token", "poll_began"),
    ("claim script", "poll_began", "claimed"),
    ("claimed -> job fn (arq run_job)", "claimed", "route_began"),
    ("job fn -> chain (parse request)", "route_began", "chain_began"),
    ("CHAIN (litellm call, = chain_ms)", "chain_began", "chain_ended"),
    ("chain -> metrics (log 'routed')", "chain_ended", "metrics_began"),
    ("metrics record + publish", "metrics_began", "metrics_ended"),
    ("metrics -> job fn returns", "metrics_ended", "route_ended"),
    ("job fn -> finish_job (arq)", "route_ended", "finish_began"),
    ("finish_job (store + push)", "finish_began", "finish_ended"),
    ("pushed -> client reader has it", "finish_ended", "delivered"),
    ("reader -> result in hand", "delivered", "in_hand"),
]


def breakdown(rows: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    out: dict[str, Any] = {}
    lines: list[list[Any]] = []
    for label, a, b in STEPS:
        values = [(r[b] - r[a]) * 1000 for r in rows if a in r and b in r]
        qs = [quantile(values, q) for q in (0.5, 0.95, 0.99)]
        out[label] = {"n": len(values), "p50": qs[0], "p95": qs[1], "p99": qs[2]}
        lines.append([label, len(values), *qs])
    logging_ms = _LITELLM_LOGGING[-len(rows) :]
    qs = [quantile(logging_ms, q) for q in (0.5, 0.95, 0.99)]
    label = "  of which litellm success logging"
    out[label] = {"n": len(logging_ms), "p50": qs[0], "p95": qs[1], "p99": qs[2]}
    at = next(i for i, line in enumerate(lines) if str(line[0]).startswith("metrics record"))
    lines.insert(at + 1, [label, len(logging_ms), *qs])
    total = [(r["in_hand"] - r["t0"]) * 1000 for r in rows]
    overhead = [t - r["chain_ms"] for t, r in zip(total, rows, strict=True)]
    for label, values in (("TOTAL", total), ("TOTAL - chain_ms", overhead)):
        qs = [quantile(values, q) for q in (0.5, 0.95, 0.99)]
        out[label] = {"n": len(values), "p50": qs[0], "p95": qs[1], "p99": qs[2]}
        lines.append([label, len(values), *qs])
    return table(["step (ms)", "n", "p50", "p95", "p99"], lines), out


def cpu_table(passes: dict[str, Pass]) -> str:
    rows: list[list[object]] = []
    names = sorted({t for p in passes.values() for t in p.threads})
    for t in names:
        rows.append(
            [f"thread {t}", *(p.threads.get(t, 0.0) / p.jobs * 1000 for p in passes.values())]
        )
    rows.append(
        ["TOTAL process", *(sum(p.threads.values()) / p.jobs * 1000 for p in passes.values())]
    )
    rows.append(["jobs/s (this pass)", *(p.jobs / p.wall for p in passes.values())])
    return table(["CPU ms per job", *passes], rows)


async def main_async(args: argparse.Namespace) -> None:
    from bench.procs import start_stub, stop_all

    stub, url = start_stub()
    try:
        timed = await work(args, url, profile=False)
        text, data = breakdown(timed.rows)
        print(f"Per-step time of a job, {len(timed.rows)} jobs, concurrency {args.concurrency}")
        print(text)
        passes = {"worker": timed}
        if args.ceiling:
            passes["in-process"] = await ceiling(args, url, profile=False)
        print("\nCPU of this process (all threads, no profiler)")
        print(cpu_table(passes))
        jobs = timed.jobs
        calls = sorted(timed.redis_calls.items(), key=lambda kv: -kv[1])
        print(f"\nRedis round trips of the worker per job ({jobs} jobs, warm-up included)")
        print(table(["command", "per job"], [[k, v / jobs] for k, v in calls]))
        summary: dict[str, Any] = {"steps": data}
        summary["cpu_ms_per_job"] = {
            k: round(sum(p.threads.values()) / p.jobs * 1000, 3) for k, p in passes.items()
        }
        if args.cprofile:
            profiled = {"worker": await work(args, url, profile=True)}
            if args.ceiling:
                profiled["in-process"] = await ceiling(args, url, profile=True)
            columns = {
                k: (by_package(p.stats), p.jobs) for k, p in profiled.items() if p.stats is not None
            }
            print(f"\ncProfile, main thread: CPU ms per job by package ({args.jobs} jobs)")
            print(package_table(columns, args.top))
            stats = profiled["worker"].stats
            if stats is not None:
                print(f"\ncProfile of the worker, top {args.top} functions by own time")
                print(top_functions(stats, args.top))
            summary["cprofile_ms_per_job"] = {
                k: {p: round(v / n * 1000, 3) for p, v in totals.items()}
                for k, (totals, n) in columns.items()
            }
        print(json.dumps({"benchmark": "profile_worker", **summary}), flush=True)
    finally:
        stub.stop()
        stop_all()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_worker", description=__doc__)
    parser.add_argument("role", nargs="?", default="worker", choices=["worker", "producer"])
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--queue", default="")
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--max-jobs", type=int, default=50)
    parser.add_argument("--cprofile", action="store_true", help="a second pass under cProfile")
    parser.add_argument("--top", type=int, default=25, help="rows listed from cProfile")
    parser.add_argument(
        "--ceiling", action="store_true", help="also the chain in-process, for comparison"
    )
    args = parser.parse_args(argv)
    if args.role == "producer":
        asyncio.run(produce(args))
        return
    set_offline_env()
    asyncio.run(main_async(args))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
