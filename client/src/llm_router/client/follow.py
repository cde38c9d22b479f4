"""``llm-router metrics --follow``: every routed job's metrics event, as it is published.

On a terminal each event is one readable line (local time, status, chain, model,
latency, cost, the attempts as ``qwen:rejected→haiku:success``); otherwise each is
its raw JSON on a line of its own, flushed, for ``jq`` and log shippers. Pub/sub
keeps nothing: only events published while following are seen.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError
from rich.text import Text

_LETTERS = re.compile(r"[A-Za-z]+")
#: Seconds between checks that the subscription's connection is still alive.
POLL_S = 1.0


def short_model(model: str) -> str:
    """A model's family, for the compact attempts: ``ollama_chat/qwen2.5:7b`` → ``qwen``,
    ``anthropic/claude-haiku-4-5-20251001`` → ``haiku``."""
    name = model.rsplit("/", 1)[-1].removeprefix("claude-")
    match = _LETTERS.match(name)
    return match.group(0) if match else name or model


def attempts_line(attempts: Any) -> str:
    """The attempts in order, ``model:outcome`` joined by arrows; retries in brackets."""
    if not isinstance(attempts, list):
        return ""
    parts = []
    for attempt in attempts:
        if not isinstance(attempt, dict):
            continue
        part = f"{short_model(str(attempt.get('model', '?')))}:{attempt.get('outcome', '?')}"
        retries = attempt.get("retries")
        if isinstance(retries, int) and retries > 0:
            part += f"[{retries} {'retry' if retries == 1 else 'retries'}]"
        parts.append(part)
    return "→".join(parts)


def _clock(timestamp: Any) -> str:
    at = timestamp if isinstance(timestamp, int | float) else time.time()
    return time.strftime("%H:%M:%S", time.localtime(at))


def _number(value: Any) -> float | None:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def event_line(event: dict[str, Any]) -> str:
    """One event as one line: time, status, chain, model, latency, cost, attempts, context."""
    latency = _number(event.get("latency_ms"))
    cost = _number(event.get("cost_usd"))
    fields = [
        _clock(event.get("timestamp")),
        f"{event.get('status', '?')!s:<15}",
        f"{event.get('chain') or '-'!s:<10}",
        str(event.get("model_used") or "none"),
        "? ms" if latency is None else f"{latency:.0f} ms",
        "$?" if cost is None else f"${cost:.4f}",
        attempts_line(event.get("attempts")),
    ]
    if event.get("context"):
        fields.append(f"context={event['context']}")
    return "  ".join(f for f in fields if f)


def styled_line(data: str) -> Text:
    """What a terminal shows for one message: the line, coloured by status; foreign
    messages (not a JSON object) as they came."""
    try:
        event = json.loads(data)
    except ValueError:
        return Text(data)
    if not isinstance(event, dict):
        return Text(data)
    style = {"ok": "green", "failed": "red", "invalid_request": "yellow"}.get(
        str(event.get("status")), ""
    )
    return Text(event_line(event), style=style)


async def follow(
    redis: Redis,
    channel: str,
    emit: Callable[[str], None],
    *,
    on_subscribed: Callable[[], None] | None = None,
) -> None:
    """Subscribe to ``channel`` and hand each message's text to ``emit``, until cancelled
    or Redis is lost (then the Redis error propagates)."""
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    try:
        await pubsub.subscribe(channel)
        if on_subscribed is not None:
            on_subscribed()
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=POLL_S)
            if message is None or message.get("type") != "message":
                continue
            data = message["data"]
            emit(data.decode(errors="replace") if isinstance(data, bytes) else str(data))
    finally:
        with contextlib.suppress(RedisError, OSError):
            await pubsub.aclose()  # type: ignore[no-untyped-call]
