"""The ``llm-router`` command: route one prompt, backfill a JSONL file, or report costs."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError
from rich.console import Console

from llm_router.client.backfill import DEFAULT_MAX_IN_FLIGHT, Backfill, BackfillSummary
from llm_router.client.client import DEFAULT_REDIS_URL, RouterClient
from llm_router.client.costs import as_json as costs_json
from llm_router.client.costs import render as render_costs
from llm_router.client.progress import ProgressView, make_progress
from llm_router.client.protocol import RouteResult
from llm_router.client.rows import BackfillError
from llm_router.client.spend import read_days

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
    route.add_argument("--timeout", type=float, default=120.0, help="seconds to wait (default 120)")
    _add_backfill(sub)
    costs = sub.add_parser(
        "costs", help="spend per chain and per model per UTC day, from the workers' counters"
    )
    costs.add_argument(
        "--days", type=_positive, default=7, help="days back, today included (default 7)"
    )
    costs.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
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
                messages, schema=schema, context=args.context, chain=args.chain
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


def _connect(url: str | None) -> Redis:
    url = url or os.environ.get("LLM_ROUTER_REDIS_URL", DEFAULT_REDIS_URL)
    redis: Redis = Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30)
    return redis


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


async def _backfill(args: argparse.Namespace) -> int:
    try:
        redis = _connect(args.redis_url)
    except ValueError as exc:  # a malformed URL (never printed: it may hold a password)
        return _fail(EXIT_USAGE, f"invalid Redis URL: {type(exc).__name__}")
    try:
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
    finally:
        await redis.aclose()
    return _ended(summary)


async def _costs(args: argparse.Namespace) -> int:
    try:
        redis = _connect(args.redis_url)
    except ValueError as exc:
        return _fail(EXIT_USAGE, f"invalid Redis URL: {type(exc).__name__}")
    try:
        days = await read_days(redis, min(args.days, 400))
    finally:
        await redis.aclose()
    if args.json:
        print(costs_json(days))
    else:
        render_costs(days, Console())
    return EXIT_OK


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
    commands = {"backfill": _backfill, "costs": _costs, "route": _route}
    command = commands[args.command](args)
    try:
        return asyncio.run(command)
    except TimeoutError as exc:
        return _fail(EXIT_TIMEOUT, str(exc))
    except (RedisError, OSError) as exc:
        return _fail(EXIT_REDIS, f"cannot reach Redis: {exc}")
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
