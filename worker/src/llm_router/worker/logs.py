"""structlog set-up: JSON lines under systemd, readable lines on a terminal.

Everything from the standard library's logging (litellm, httpx, redis) goes
through the same renderer; litellm's and httpx's chatter at INFO (request URLs,
model lists) is held at WARNING.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

QUIET_AT_INFO = ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "httpx")


def configure_logging(
    level: str = "INFO", fmt: Literal["auto", "json", "console"] = "auto"
) -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                # Tracebacks from stdlib records as text, not "<traceback object>".
                *([structlog.processors.format_exc_info] if use_json else []),
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    quiet = max(logging.getLevelName(level), logging.WARNING)
    for name in QUIET_AT_INFO:
        logging.getLogger(name).setLevel(quiet)
        logging.getLogger(name).propagate = True
