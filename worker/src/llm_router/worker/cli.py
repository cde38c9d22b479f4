"""The ``llm-router-worker`` command: check the settings, then run the daemon."""

from __future__ import annotations

import argparse
import sys

from llm_router.worker.settings import ConfigError, load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llm-router-worker",
        description="Run the llm-router worker: route queued LLM requests local-first.",
    )
    parser.add_argument(
        "--config", metavar="PATH", help="TOML settings file (or LLM_ROUTER_CONFIG)"
    )
    parser.add_argument(
        "--check", action="store_true", help="validate the settings, print the chains and exit"
    )
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"llm-router-worker: {exc}", file=sys.stderr)
        return 2

    from llm_router.worker.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    if args.check:
        for name, chain in settings.chains.items():
            print(f"{name}: " + " -> ".join(str(m) for m in chain))
        return 0

    # Heavy imports (litellm) only once the settings are known to be good.
    from llm_router.worker import calls
    from llm_router.worker.jobs import create_worker

    calls.warm_up()
    worker = create_worker(settings)
    worker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
