"""The shared spend counters: one Redis hash per UTC day, written by every worker.

``llm_router:spend:<YYYY-MM-DD>`` holds integer fields (money in nano-dollars, so
that thousands of workers adding to it never drift as floats would):

* ``chain|<chain>|spent_nusd``, ``|calls``: what the chain's calls cost that day;
* ``chain|<chain>|reserved_nusd``: worst-case cost of its calls in flight (budgets);
* ``chain|<chain>|budget_nusd``: the budget the workers last enforced, if any;
* ``model|<model>|cost_nusd``, ``|calls``, ``|input_tokens``, ``|output_tokens``,
  ``|cache_read_input_tokens``, ``|cache_creation_input_tokens``.

Workers write it (``llm_router.worker.budgets``); ``llm-router costs`` reads it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from llm_router.client.keys import spend_key

#: The day's hash and its holds are kept this long (a year and a bit, for reports).
SPEND_TTL_S = 400 * 86_400
NANO_USD = 1_000_000_000
DAY_S = 86_400

MODEL_FIELDS = (
    "calls",
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "cost_nusd",
)


def utc_day(at: float | None = None) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(time.time() if at is None else at))


def to_nusd(usd: float) -> int:
    return max(0, round(usd * NANO_USD))


def to_usd(nusd: int) -> float:
    return nusd / NANO_USD


@dataclass
class ChainSpend:
    spent_usd: float = 0.0
    calls: int = 0
    reserved_usd: float = 0.0
    budget_usd: float | None = None


@dataclass
class ModelSpend:
    cost_usd: float = 0.0
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0


@dataclass
class DaySpend:
    day: str
    chains: dict[str, ChainSpend] = field(default_factory=dict)
    models: dict[str, ModelSpend] = field(default_factory=dict)

    @property
    def total_usd(self) -> float:
        return sum(c.spent_usd for c in self.chains.values())


def parse_day(day: str, raw: dict[Any, Any]) -> DaySpend:
    """The day's hash as ``HGETALL`` returns it; fields it does not know are ignored."""
    spend = DaySpend(day)
    for key, value in raw.items():
        name = key.decode() if isinstance(key, bytes) else str(key)
        kind, _, rest = name.partition("|")
        subject, _, metric = rest.rpartition("|")
        try:
            number = int(value)
        except ValueError:
            continue
        if kind == "chain" and subject:
            chain = spend.chains.setdefault(subject, ChainSpend())
            if metric == "spent_nusd":
                chain.spent_usd = to_usd(number)
            elif metric == "calls":
                chain.calls = number
            elif metric == "reserved_nusd":
                chain.reserved_usd = to_usd(max(0, number))
            elif metric == "budget_nusd":
                chain.budget_usd = to_usd(number)
        elif kind == "model" and subject and metric in MODEL_FIELDS:
            model = spend.models.setdefault(subject, ModelSpend())
            if metric == "cost_nusd":
                model.cost_usd = to_usd(number)
            else:
                setattr(model, metric, number)
    return spend


async def read_days(redis: Redis, days: int, *, now: float | None = None) -> list[DaySpend]:
    """The last ``days`` UTC days, today first, in one round trip."""
    at = time.time() if now is None else now
    names = [utc_day(at - i * DAY_S) for i in range(days)]
    async with redis.pipeline(transaction=False) as pipe:
        for day in names:
            pipe.hgetall(spend_key(day))
        raws: list[dict[Any, Any]] = await pipe.execute()
    return [parse_day(day, raw) for day, raw in zip(names, raws, strict=True)]
