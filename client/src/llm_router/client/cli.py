"""The ``llm-router`` command: route one prompt through the queue from a shell."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from redis.exceptions import RedisError

from llm_router.client.client import RouterClient
from llm_router.client.protocol import RouteResult

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REDIS, EXIT_TIMEOUT = 0, 1, 2, 3, 4


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
    return parser


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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(_route(args))
    except TimeoutError as exc:
        return _fail(EXIT_TIMEOUT, str(exc))
    except (RedisError, OSError) as exc:
        return _fail(EXIT_REDIS, f"cannot reach Redis: {exc}")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
