"""The fleet's shared counters: per model and outcome, in one Redis hash every worker adds to.

Field ``<model>|<outcome>`` of ``llm_router:metrics:counters``, an integer; the model
is everything before the last ``|``. Workers add to it (once per job); ``llm-router
status``, ``/metrics`` and every metrics event read it. One more field, ``cache_hits``
(no ``|``, so no model), counts the jobs answered from the response cache.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis

from llm_router.client.keys import METRICS_COUNTERS_KEY

OUTCOMES = ("success", "fallback", "error", "skipped")
#: The counters hash's field of jobs answered from the response cache (no model was called).
CACHE_HITS_FIELD = "cache_hits"


class ModelCounts(BaseModel):
    """One model's shared counters (the ``<model>|<outcome>`` fields of the counters hash)."""

    model_config = ConfigDict(extra="ignore")

    success: int = Field(ge=0, description="the model's answer was accepted")
    fallback: int = Field(ge=0, description="rejected, and a later model was tried")
    error: int = Field(ge=0, description="rejected, and it was the last model tried")
    skipped: int = Field(ge=0, description="not called: busy, or its circuit breaker open")

    @property
    def success_rate(self) -> float | None:
        """Accepted answers of the calls made (skips were not calls); None before any."""
        tried = self.success + self.fallback + self.error
        return self.success / tried if tried else None


def parse_counters(raw: Mapping[Any, Any] | Sequence[Any]) -> dict[str, ModelCounts]:
    """The hash as ``HGETALL`` gives it (a dict from redis-py, a flat list from Lua),
    per model; fields that are not ``<model>|<outcome>`` with an integer are passed over."""
    items = raw.items() if isinstance(raw, Mapping) else zip(raw[::2], raw[1::2], strict=True)
    counts: dict[str, dict[str, int]] = {}
    for key, value in items:
        name = key.decode() if isinstance(key, bytes) else str(key)
        model, _, outcome = name.rpartition("|")
        if not model or outcome not in OUTCOMES:
            continue
        try:
            number = int(value)
        except ValueError:
            continue
        counts.setdefault(model, dict.fromkeys(OUTCOMES, 0))[outcome] = number
    return {model: ModelCounts(**counts[model]) for model in sorted(counts)}


async def read_counters(redis: Redis) -> dict[str, ModelCounts]:
    raw: dict[Any, Any] = await redis.hgetall(METRICS_COUNTERS_KEY)  # type: ignore[misc]
    return parse_counters(raw)


def field_count(raw: Mapping[Any, Any], field: str) -> int:
    """One counter of a hash as ``HGETALL`` gives it (bytes or str keys); a field that is
    missing, or not a count, is 0."""
    value = raw.get(field.encode(), raw.get(field, 0))
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0


def cache_hits(raw: Mapping[Any, Any]) -> int:
    """Jobs answered from the response cache, from the hash as ``HGETALL`` gives it."""
    return field_count(raw, CACHE_HITS_FIELD)
