"""A plain arq worker doing our job's work: arq's defaults (pickle, polling), our Router.

``python -m bench.arq_baseline --queue Q --chains JSON [--poll-delay S]``: without
``--poll-delay`` the worker polls at arq's default (0.5 s). The job builds nothing per
call: the Router is built once in ``on_startup``, as in our worker, and the job returns
``RouteResult.model_dump(mode="json")`` so the producer can subtract ``chain_ms``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from bench.common import set_offline_env

set_offline_env()

from arq.connections import RedisSettings  # noqa: E402
from arq.worker import Worker, func  # noqa: E402

from llm_router.client import RouteRequest  # noqa: E402
from llm_router.worker import calls  # noqa: E402
from llm_router.worker.logs import configure_logging  # noqa: E402
from llm_router.worker.router import Router  # noqa: E402
from llm_router.worker.settings import Settings  # noqa: E402


async def route(ctx: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    router: Router = ctx["router"]
    parsed = RouteRequest.model_validate(request)
    result = await router.run(parsed, job_id=ctx["job_id"])
    return result.model_dump(mode="json")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.arq_baseline", description=__doc__)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--chains", required=True, help="chains as JSON (LLM_ROUTER_CHAINS)")
    parser.add_argument("--metrics-channel", required=True)
    parser.add_argument("--poll-delay", type=float, default=None, help="default: arq's (0.5 s)")
    args = parser.parse_args(argv)

    settings = Settings(
        chains=json.loads(args.chains), metrics_channel=args.metrics_channel, queue_name=args.queue
    )
    # Same log set-up as our worker at WARNING: arq's INFO lines and ours are dropped.
    configure_logging("WARNING", "json")
    calls.warm_up()

    async def startup(ctx: dict[str, Any]) -> None:
        ctx["router"] = Router(settings, redis=ctx["redis"])

    options: dict[str, Any] = {}
    if args.poll_delay is not None:
        options["poll_delay"] = args.poll_delay
    worker = Worker(
        functions=[func(route, name="route")],
        redis_settings=RedisSettings.from_dsn(args.redis_url),
        queue_name=args.queue,
        on_startup=startup,
        **options,
    )
    worker.run()


if __name__ == "__main__":
    main()
