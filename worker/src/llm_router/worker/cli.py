"""The ``llm-router-worker`` command: check the settings, then run the daemon."""

from __future__ import annotations

import argparse
import sys

from llm_router.worker.settings import ConfigError, Settings, load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llm-router-worker",
        description="Run the llm-router worker: route queued LLM requests local-first.",
    )
    parser.add_argument(
        "--config", metavar="PATH", help="TOML settings file (or LLM_ROUTER_CONFIG)"
    )
    checks = parser.add_mutually_exclusive_group()
    checks.add_argument(
        "--check",
        action="store_true",
        help=(
            "validate the settings and print the chains, then check health: exit 0 if Redis "
            "answers and a live worker serves queue_name, else 1 (2: a bad setting)"
        ),
    )
    checks.add_argument(
        "--check-config",
        action="store_true",
        help="only validate the settings and print the chains (exit 0, or 2: a bad setting)",
    )
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"llm-router-worker: {exc}", file=sys.stderr)
        return 2

    from llm_router.worker.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    if args.check or args.check_config:
        for name, chain in settings.chains.items():
            print(f"{name}: " + " -> ".join(str(m) for m in chain))
        if args.check_config:
            return 0
        return _health(settings)

    # Heavy imports (litellm) only once the settings are known to be good.
    import asyncio

    from llm_router.worker import calls
    from llm_router.worker.services import serve

    calls.warm_up()
    asyncio.run(serve(settings))
    return 0


def _health(settings: Settings) -> int:
    """``llm-router health`` for this worker's Redis and queue: 0 healthy, 1 not."""
    import asyncio

    from llm_router.client.cli import _connect
    from llm_router.client.health import Health, check

    async def run() -> Health:
        redis = _connect(settings.redis_url.get_secret_value())
        try:
            return await check(redis, settings.queue_name)
        finally:
            await redis.aclose()

    try:
        health = asyncio.run(run())
    except ValueError as exc:  # a malformed URL, never printed: it may hold a password
        health = Health(False, f"unhealthy: the Redis URL is invalid: {type(exc).__name__}")
    if not health.ok:
        print(f"llm-router-worker: {health.line}", file=sys.stderr)
        return 1
    print(health.line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
