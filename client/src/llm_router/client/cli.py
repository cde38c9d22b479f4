"""The ``llm-router`` command: route one prompt, backfill a JSONL file, report costs, or
look at the fleet (health, status, metrics, the response cache)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

from llm_router.client.backfill import (
    DEFAULT_MAX_IN_FLIGHT,
    Backfill,
    BackfillSummary,
    default_batch_queue,
)
from llm_router.client.cache import purge as purge_cache
from llm_router.client.cache import read_stats as read_cache_stats
from llm_router.client.client import DEFAULT_REDIS_URL, RouterClient
from llm_router.client.connections import redis_from_url
from llm_router.client.costs import as_json as costs_json
from llm_router.client.costs import render as render_costs
from llm_router.client.counters import cache_hits, parse_counters
from llm_router.client.failed import FailedJobs
from llm_router.client.follow import follow, styled_line
from llm_router.client.health import check
from llm_router.client.keys import DEFAULT_QUEUE, METRICS_CHANNEL, METRICS_COUNTERS_KEY
from llm_router.client.progress import ProgressView, make_progress
from llm_router.client.protocol import MAX_CACHE_TTL_S, MAX_EXPIRES_IN_S, RouteResult
from llm_router.client.rows import BackfillError
from llm_router.client.server import RedisFull
from llm_router.client.spend import read_days
from llm_router.client.status import Status, collect, models_json, models_table
from llm_router.client.status import as_json as status_json
from llm_router.client.status import render as render_status

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REDIS, EXIT_TIMEOUT = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-router", description=__doc__)
    parser.add_argument("--redis-url", help="Redis URL (default: LLM_ROUTER_REDIS_URL)")
    parser.add_argument("--queue", help="queue name (default: LLM_ROUTER_QUEUE_NAME)")
    sub = parser.add_subparsers(dest="command", required=True)
    route = sub.add_parser("route", help="enqueue one prompt, wait, print the result as JSON")
    route.add_argument("prompt", help="the user message ('-' reads standard input)")
    route.add_argument("--system", help="a system message sent before the prompt")
    route.add_argument(
        "--schema", type=Path, metavar="FILE", help="JSON Schema the answer must fit"
    )
    route.add_argument("--context", help="a label that appears in the worker's logs")
    route.add_argument("--chain", help="named chain to use (default: the worker's 'default')")
    route.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds to wait (default 120); the job expires with the wait",
    )
    route.add_argument(
        "--cache-ttl",
        type=_cache_ttl,
        metavar="SECONDS",
        help="answer from the response cache if the same request was answered within "
        "SECONDS, and keep this answer as long (0: not at all; default: the chain's)",
    )
    cancel = sub.add_parser(
        "cancel",
        help="stop queued or running jobs; they end 'cancelled'",
        description=(
            "Ask for each job to stop: a queued job is never run, a running one stops "
            "within about a second, its model call abandoned. Exit 0 when every job was "
            "queued or running, 1 when some had finished (their results stay) or are unknown."
        ),
    )
    cancel.add_argument("job_ids", nargs="+", metavar="JOB_ID")
    _add_backfill(sub)
    costs = sub.add_parser(
        "costs", help="spend per chain and per model per UTC day, from the workers' counters"
    )
    costs.add_argument(
        "--days", type=_positive, default=7, help="days back, today included (default 7)"
    )
    costs.add_argument("--json", action="store_true", help="print JSON instead of tables")
    _add_ops(sub)
    _add_failed(sub)
    _add_cache(sub)
    return parser


def _add_cache(sub: Any) -> None:
    cache = sub.add_parser(
        "cache",
        help="the response cache: stats, purge",
        description=(
            "The response cache the workers keep for requests that ask for it (cache_ttl, "
            "or a chain's default): how often it answered, and emptying it."
        ),
    )
    verbs = cache.add_subparsers(dest="verb", required=True)
    stats = verbs.add_parser(
        "stats", help="entries (counted with SCAN), hits, misses, stores, hit ratio"
    )
    stats.add_argument("--json", action="store_true", help="print one JSON object instead")
    verbs.add_parser(
        "purge", help="delete every entry (SCAN and UNLINK in batches); the counters stay"
    )


def _add_failed(sub: Any) -> None:
    failed = sub.add_parser(
        "failed",
        help="jobs that ended failed or expired: list, show, requeue, purge",
        description=(
            "The failed-job registry: jobs that ended failed (every model failed, a poison "
            "job, a job that overran) or expired, kept with their request and result "
            "(the worker settings failed_keep and failed_keep_seconds bound it)."
        ),
    )
    verbs = failed.add_subparsers(dest="verb", required=True)
    listing = verbs.add_parser("list", help="the newest first: id, when, status, error")
    listing.add_argument("--limit", type=_positive, default=50, help="how many (default 50)")
    listing.add_argument("--json", action="store_true", help="one JSON object a line")
    show = verbs.add_parser("show", help="one job: its request and its result, as JSON")
    show.add_argument("job_id", metavar="JOB_ID")
    requeue = verbs.add_parser(
        "requeue", help="put jobs back on their queue, to run exactly once more"
    )
    which = requeue.add_mutually_exclusive_group(required=True)
    which.add_argument("job_ids", nargs="*", default=[], metavar="JOB_ID")
    which.add_argument("--all", action="store_true", help="every job in the registry")
    verbs.add_parser("purge", help="forget every job in the registry")


def _add_ops(sub: Any) -> None:
    sub.add_parser(
        "health",
        help="exit 0 if Redis answers and a live worker serves the queue, else 1",
        description=(
            "One line: on stdout and exit 0 when Redis answers and at least one live worker "
            "serves --queue; on stderr and exit 1 otherwise. For systemd, cron and probes."
        ),
    )
    status = sub.add_parser(
        "status", help="workers, queues, models, breakers and today's spend on one screen"
    )
    status.add_argument(
        "--watch",
        nargs="?",
        type=_seconds,
        const=2.0,
        metavar="SECONDS",
        help="refresh in place every SECONDS (default 2) until Ctrl-C",
    )
    status.add_argument("--json", action="store_true", help="print one JSON object instead")
    status.add_argument(
        "--batch-queue",
        metavar="NAME",
        help="batch queue (default: LLM_ROUTER_BATCH_QUEUE_NAME, else llm_router:batch)",
    )
    metrics = sub.add_parser(
        "metrics", help="the shared counters per model, or --follow the metrics events"
    )
    metrics.add_argument(
        "--follow",
        action="store_true",
        help="print each routed job's event as it is published, until Ctrl-C",
    )
    metrics.add_argument(
        "--channel",
        help="metrics channel (default: LLM_ROUTER_METRICS_CHANNEL, else llm_router_metrics)",
    )
    metrics.add_argument(
        "--json", action="store_true", help="JSON (with --follow: raw events even on a terminal)"
    )


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0.1:  # also NaN
        raise argparse.ArgumentTypeError("must be at least 0.1")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _cache_ttl(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_CACHE_TTL_S:
        raise argparse.ArgumentTypeError(f"must be 0 to {MAX_CACHE_TTL_S} (30 days)")
    return value


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not 0 < value <= MAX_EXPIRES_IN_S:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most {MAX_EXPIRES_IN_S:g}")
    return value


def _add_backfill(sub: Any) -> None:
    backfill = sub.add_parser(
        "backfill",
        help="route every row of a JSONL file through the batch queue (resumable)",
        description=(
            "Route every row of INPUT (one JSON object a line: 'messages' or 'prompt', "
            "optional 'id', 'schema', 'metadata') and append one result row per input "
            "row to OUTPUT. Interrupted (Ctrl-C, a crash), the same command resumes: "
            "rows already in OUTPUT are skipped and no row is routed twice."
        ),
    )
    backfill.add_argument("input", type=Path, metavar="INPUT.jsonl", help="the rows to route")
    backfill.add_argument(
        "--output", type=Path, required=True, metavar="OUTPUT.jsonl", help="results, appended"
    )
    backfill.add_argument(
        "--schema", type=Path, metavar="FILE", help="JSON Schema for rows without their own"
    )
    backfill.add_argument("--chain", help="named chain (default: the worker's batch chain)")
    backfill.add_argument(
        "--max-in-flight",
        type=_positive,
        default=DEFAULT_MAX_IN_FLIGHT,
        metavar="N",
        help=f"rows queued or running at once (default {DEFAULT_MAX_IN_FLIGHT})",
    )
    backfill.add_argument("--context", help="a label that appears in the worker's logs")
    backfill.add_argument(
        "--expires-in",
        type=_positive_seconds,
        metavar="SECONDS",
        help="a row not started this long after it is queued ends 'expired' (default: never)",
    )
    backfill.add_argument(
        "--cache-ttl",
        type=_cache_ttl,
        metavar="SECONDS",
        help="answer rows from the response cache when the same request was answered "
        "within SECONDS (a rerun into another file), and keep each answer as long "
        "(0: not at all; default: the chain's)",
    )
    backfill.add_argument(
        "--batch-queue",
        metavar="NAME",
        help="batch queue (default: LLM_ROUTER_BATCH_QUEUE_NAME, else llm_router:batch)",
    )


def _fail(code: int, message: str) -> int:
    print(f"llm-router: {message}", file=sys.stderr)
    return code


async def _route(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    messages: list[dict[str, Any]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": prompt})
    schema = None
    if args.schema is not None:
        try:
            schema = json.loads(args.schema.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            return _fail(EXIT_USAGE, f"cannot read schema {args.schema}: {exc}")
    # A shell user wants to hear at once that Redis is down, not after 30 s of retries.
    async with RouterClient(args.redis_url, queue_name=args.queue, reconnect_for=2.0) as client:
        try:
            handle = await client.enqueue(
                messages,
                schema=schema,
                context=args.context,
                chain=args.chain,
                expires_in=args.timeout if args.timeout > 0 else None,
                cache_ttl=args.cache_ttl,
            )
        except ValidationError as exc:
            return _fail(EXIT_USAGE, f"invalid request: {exc.errors()[0]['msg']}")
        result: RouteResult = await handle.result(timeout=args.timeout, raise_on_failure=False)
    print(result.model_dump_json(indent=2))
    if result.ok:
        return EXIT_OK
    print(f"llm-router: {result.status}: {result.error}", file=sys.stderr)
    for attempt in result.attempts:
        print(
            f"  {attempt.model}: {attempt.outcome} ({attempt.reason}) [{attempt.latency_ms} ms]",
            file=sys.stderr,
        )
    return EXIT_FAILED


async def _cancel(args: argparse.Namespace) -> int:
    async with RouterClient(args.redis_url, queue_name=args.queue, reconnect_for=2.0) as client:
        code = EXIT_OK
        for job_id in args.job_ids:
            if await client.cancel(job_id):
                print(f"{job_id}: cancelled")
            else:
                print(f"{job_id}: not queued or running (finished, or unknown)", file=sys.stderr)
                code = EXIT_FAILED
    return code


def _connect(url: str | None) -> Redis:
    url = url or os.environ.get("LLM_ROUTER_REDIS_URL", DEFAULT_REDIS_URL)
    return redis_from_url(url, socket_connect_timeout=5, health_check_interval=30)


Command = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]


def _with_redis(
    code: int = EXIT_USAGE, message: str = "invalid Redis URL"
) -> Callable[[Callable[[argparse.Namespace, Redis], Awaitable[int]]], Command]:
    """Give a command its Redis connection, closed after it; a malformed URL is one line
    (never the URL itself: it may hold a password) and exit ``code``."""

    def wrap(command: Callable[[argparse.Namespace, Redis], Awaitable[int]]) -> Command:
        @functools.wraps(command)
        async def run(args: argparse.Namespace) -> int:
            try:
                redis = _connect(args.redis_url)
            except ValueError as exc:
                return _fail(code, f"{message}: {type(exc).__name__}")
            try:
                return await command(args, redis)
            finally:
                await redis.aclose()

        return run

    return wrap


def _read_schema(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        schema = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise BackfillError(f"cannot read schema {path}: {exc}") from None
    if not isinstance(schema, dict):
        raise BackfillError(f"schema {path} is not a JSON object")
    return schema


@_with_redis()
async def _backfill(args: argparse.Namespace, redis: Redis) -> int:
    try:
        backfill = Backfill(
            redis,
            args.input,
            args.output,
            schema=_read_schema(args.schema),
            chain=args.chain,
            context=args.context,
            max_in_flight=args.max_in_flight,
            batch_queue=args.batch_queue,
            expires_in=args.expires_in,
            cache_ttl=args.cache_ttl,
        )
    except (BackfillError, ValueError) as exc:
        return _fail(EXIT_USAGE, str(exc))
    try:
        await redis.ping()
    except (RedisError, OSError) as exc:
        return _fail(EXIT_REDIS, f"cannot reach Redis: {exc}")
    view = make_progress()
    # What start-up made (pydantic's and rich's tables, modules) lives as long as the
    # process: out of the collector's sight, a full collection costs the rows only.
    gc.collect()
    gc.freeze()
    try:
        summary = await _run_with_view(backfill, view)
    except BackfillError as exc:
        return _fail(EXIT_USAGE, str(exc))
    except RedisError as exc:
        return _fail(EXIT_REDIS, f"cannot reach Redis: {exc}")
    except OSError as exc:
        return _fail(EXIT_FAILED, f"cannot write the output: {exc}")
    return _ended(summary)


@_with_redis()
async def _costs(args: argparse.Namespace, redis: Redis) -> int:
    days = await read_days(redis, min(args.days, 400))
    if args.json:
        print(costs_json(days))
    else:
        render_costs(days, Console())
    return EXIT_OK


@_with_redis()
async def _failed(args: argparse.Namespace, redis: Redis) -> int:
    registry = FailedJobs(redis)
    if args.verb == "list":
        entries = await registry.list(args.limit)
        for entry in entries:
            row = {
                "job_id": entry.job_id,
                "queue": entry.queue,
                "failed_at": entry.failed_at,
                "status": entry.result.status,
                "error": entry.result.error,
            }
            if args.json:
                print(json.dumps(row))
            else:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(entry.failed_at))
                print(f"{entry.job_id}  {when}Z  {entry.result.status}: {entry.result.error}")
        if not args.json:
            print(f"{len(entries)} shown of {await registry.count()}", file=sys.stderr)
        return EXIT_OK
    if args.verb == "show":
        found = await registry.show(args.job_id)
        if found is None:
            return _fail(EXIT_FAILED, f"{args.job_id}: not in the failed-job registry")
        print(
            json.dumps(
                {
                    "job_id": found.job_id,
                    "queue": found.queue,
                    "failed_at": found.failed_at,
                    "request": found.request,
                    "result": found.result.model_dump(mode="json"),
                },
                indent=2,
                ensure_ascii=False,
            )
        )
        return EXIT_OK
    if args.verb == "requeue":
        ids = [i for i, _ in await registry.ids()] if args.all else args.job_ids
        code = EXIT_OK
        for job_id in ids:
            why = await registry.requeue(job_id)
            if why is None:
                print(f"{job_id}: requeued")
            else:
                print(f"{job_id}: not requeued: {why}", file=sys.stderr)
                code = EXIT_FAILED
        return code
    print(f"purged {await registry.purge()} jobs")
    return EXIT_OK


@_with_redis()
async def _cache(args: argparse.Namespace, redis: Redis) -> int:
    try:
        if args.verb == "purge":
            print(f"purged {await purge_cache(redis)} cache entries")
            return EXIT_OK
        stats = await read_cache_stats(redis)
    except (RedisError, OSError) as exc:
        return _fail(EXIT_REDIS, f"cannot reach Redis: {type(exc).__name__}")
    if args.json:
        print(json.dumps(stats.as_json(), indent=2))
        return EXIT_OK
    ratio = "—" if stats.hit_ratio is None else f"{stats.hit_ratio:.1%}"
    print(f"entries    {stats.entries}")
    print(f"hits       {stats.hits}")
    print(f"misses     {stats.misses}")
    print(f"stores     {stats.stores}")
    print(f"hit ratio  {ratio}")
    return EXIT_OK


def _queue(args: argparse.Namespace) -> str:
    name: str = args.queue or os.environ.get("LLM_ROUTER_QUEUE_NAME") or DEFAULT_QUEUE
    return name


@_with_redis(EXIT_FAILED, "unhealthy: the Redis URL is invalid")  # a probe needs "not 0"
async def _health(args: argparse.Namespace, redis: Redis) -> int:
    health = await check(redis, _queue(args))
    if not health.ok:
        return _fail(EXIT_FAILED, health.line)
    print(health.line)
    return EXIT_OK


@_with_redis()
async def _status(args: argparse.Namespace, redis: Redis) -> int:
    queues = list(dict.fromkeys([_queue(args), args.batch_queue or default_batch_queue()]))
    try:
        status = await collect(redis, queues)
    except (RedisError, OSError) as exc:
        return _fail(EXIT_REDIS, f"cannot reach Redis: {type(exc).__name__}")
    if args.json and args.watch is None:
        print(json.dumps(status_json(status), indent=2))
        return EXIT_OK
    if args.watch is None:
        console = Console()
        console.print(_screen(console, status))
        return EXIT_OK
    return await _watch_status(redis, queues, args.watch, status, as_json=args.json)


def _screen(console: Console, status: Status) -> RenderableType:
    """Fitted to a terminal's width; for a pipe or a file, every column."""
    return render_status(status, console.width if console.is_terminal else None)


async def _watch_status(
    redis: Redis, queues: list[str], every: float, first: Status, *, as_json: bool
) -> int:
    """Refresh until Ctrl-C: JSON lines (exit 3 when Redis goes), or the screen in place
    (which says Redis is away and keeps trying)."""
    if as_json:
        status = first
        while True:
            print(json.dumps(status_json(status)), flush=True)
            await asyncio.sleep(every)
            try:
                status = await collect(redis, queues)
            except (RedisError, OSError) as exc:
                return _fail(EXIT_REDIS, f"lost Redis: {type(exc).__name__}")
    console = Console()
    last = first
    with Live(_screen(console, first), console=console, auto_refresh=False) as live:
        while True:
            await asyncio.sleep(every)
            try:
                last = await collect(redis, queues)
            except (RedisError, OSError) as exc:
                away = Text(
                    f"Redis does not answer ({type(exc).__name__}); "
                    f"trying again every {every:g} s — the last view:",
                    style="bold red",
                )
                live.update(Group(away, _screen(console, last)), refresh=True)
            else:
                live.update(_screen(console, last), refresh=True)


@_with_redis()
async def _metrics(args: argparse.Namespace, redis: Redis) -> int:
    if args.follow:
        return await _follow(redis, args)
    try:
        raw: dict[Any, Any] = await redis.hgetall(METRICS_COUNTERS_KEY)  # type: ignore[misc]
        models, hits = parse_counters(raw), cache_hits(raw)
    except (RedisError, OSError) as exc:
        return _fail(EXIT_REDIS, f"cannot reach Redis: {type(exc).__name__}")
    if args.json:
        print(json.dumps(models_json(models), indent=2))
        return EXIT_OK
    if models:
        Console().print(models_table(models, "Counters per model (all workers, all time)"))
    elif not hits:
        print("No jobs counted yet.")
    if hits:
        print(f"Answered from the response cache: {hits} jobs (no model called)")
    return EXIT_OK


async def _follow(redis: Redis, args: argparse.Namespace) -> int:
    channel = args.channel or os.environ.get("LLM_ROUTER_METRICS_CHANNEL") or METRICS_CHANNEL
    raw = args.json or not sys.stdout.isatty()
    subscribed = False
    console = Console(highlight=False)

    def emit(data: str) -> None:
        if raw:
            sys.stdout.write(data + "\n")
            sys.stdout.flush()
        else:
            console.print(styled_line(data), soft_wrap=True)  # one line, however long

    def ready() -> None:
        nonlocal subscribed
        subscribed = True
        if sys.stderr.isatty():
            print(f"following {channel!r} (Ctrl-C stops)", file=sys.stderr)

    try:
        await follow(redis, channel, emit, on_subscribed=ready)
    except BrokenPipeError:  # the reader went away (| head -1): done
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except (RedisError, OSError) as exc:
        verb = "lost" if subscribed else "cannot reach"
        return _fail(EXIT_REDIS, f"{verb} Redis: {type(exc).__name__}")
    return EXIT_OK  # pragma: no cover - follow() returns only by raising


async def _run_with_view(backfill: Backfill, view: ProgressView) -> BackfillSummary:
    """Run with the view on; the first Ctrl-C stops cleanly, a second one at once."""
    loop = asyncio.get_running_loop()

    def interrupted() -> None:
        loop.remove_signal_handler(signal.SIGINT)
        backfill.stop()

    with contextlib.suppress(NotImplementedError, RuntimeError):  # not on this platform
        loop.add_signal_handler(signal.SIGINT, interrupted)
    backfill.on_progress = view.update
    try:
        with view:
            summary = await backfill.run()
            view.finish(summary)
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
    return summary


def _ended(summary: BackfillSummary) -> int:
    if summary.ended == "redis_error":
        _fail(EXIT_REDIS, f"lost Redis: {summary.error}")
    if summary.missing:
        _fail(
            EXIT_FAILED,
            f"{summary.missing} rows missing — run the same command again to resume",
        )
    if summary.ended == "interrupted":
        return EXIT_INTERRUPTED
    if summary.ended == "redis_error":
        return EXIT_REDIS
    return EXIT_FAILED if summary.missing else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {
        "backfill": _backfill,
        "cache": _cache,
        "cancel": _cancel,
        "costs": _costs,
        "failed": _failed,
        "health": _health,
        "metrics": _metrics,
        "route": _route,
        "status": _status,
    }
    command = commands[args.command](args)
    try:
        return asyncio.run(command)
    except TimeoutError as exc:
        return _fail(EXIT_TIMEOUT, str(exc))
    except RedisFull as exc:
        return _fail(EXIT_REDIS, str(exc))
    except (RedisError, OSError) as exc:
        return _fail(EXIT_REDIS, f"cannot reach Redis: {exc}")
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
