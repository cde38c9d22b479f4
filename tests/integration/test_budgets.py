"""The budget ledger's rules against the real Redis server (its Lua scripts), and the
same rules in memory: holds, settling, stale holds, local models, Redis away."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis.asyncio import Redis

from llm_router.client.keys import holds_key, spend_key
from llm_router.client.spend import NANO_USD, parse_day, utc_day
from llm_router.worker.budgets import Hold, Ledger
from llm_router.worker.costs import Usage
from llm_router.worker.settings import ModelConfig

pytestmark = pytest.mark.integration

HAIKU = ModelConfig(model="anthropic/claude-haiku-4-5-20251001", timeout=10)
QWEN = ModelConfig(model="ollama_chat/qwen2.5:7b", timeout=10)
#: A fixed instant on a day of its own, so these tests never share a hash with others.
NOW = 4_102_444_800.0 + 86_400 * (uuid.uuid4().int % 3650)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def day(redis: Redis) -> str:
    name = utc_day(NOW)
    await redis.delete(spend_key(name), holds_key(name))
    return name


def ledgers(redis: Redis, budget: float, clock: Clock) -> list[Ledger]:
    return [Ledger(redis, {"c": budget}, clock=clock), Ledger(None, {"c": budget}, clock=clock)]


def usage(cost: float, tokens: int = 10) -> Usage:
    return Usage(input_tokens=tokens, output_tokens=tokens, cost_usd=cost)


@pytest.mark.parametrize("backend", ["redis", "memory"])
async def test_calls_are_admitted_while_spent_plus_held_is_below_the_budget(
    redis: Redis, day: str, backend: str
) -> None:
    clock = Clock()
    ledger = ledgers(redis, 1.0, clock)[backend == "memory"]
    first = await ledger.hold("c", HAIKU, 0.6)
    second = await ledger.hold("c", HAIKU, 0.6)  # 0.6 held < 1.0: admitted
    third = await ledger.hold("c", HAIKU, 0.6)  # 1.2 held: refused
    assert isinstance(first, Hold)
    assert isinstance(second, Hold)
    assert isinstance(third, str)
    assert third.startswith("budget: chain 'c' has spent $0.0000")
    assert "$1.2000 more held by calls in flight" in third
    await ledger.settle(first, HAIKU, usage(0.25))
    await ledger.settle(second, HAIKU, usage(0.25))
    again = await ledger.hold("c", HAIKU, 0.6)  # spent 0.5 < 1.0
    assert isinstance(again, Hold)
    await ledger.settle(again, HAIKU, usage(0.6))
    refused = await ledger.hold("c", HAIKU, 0.01)
    assert isinstance(refused, str)
    assert "has spent $1.1000 of its $1.0000" in refused
    assert f"for {day} (UTC)" in refused


async def test_a_call_waits_for_holds_in_flight_instead_of_being_skipped(
    redis: Redis, day: str
) -> None:
    ledger = Ledger(redis, {"c": 1.0}, clock=Clock())
    first = await ledger.hold("c", HAIKU, 1.0)  # a worst case; it will cost far less
    assert isinstance(first, Hold)

    async def settle_soon() -> None:
        await asyncio.sleep(0.3)
        await ledger.settle(first, HAIKU, usage(0.01))

    settling = asyncio.create_task(settle_soon())
    started = asyncio.get_running_loop().time()
    second = await ledger.hold("c", HAIKU, 1.0, wait_s=5.0)
    waited = asyncio.get_running_loop().time() - started
    await settling
    assert isinstance(second, Hold)
    assert 0.25 < waited < 4.0
    timed_out = await ledger.hold("c", HAIKU, 0.9, wait_s=0.3)  # held, and nothing settles
    assert isinstance(timed_out, str)
    assert "more held by calls in flight" in timed_out


async def test_a_spent_budget_skips_at_once_however_long_a_call_may_wait(
    redis: Redis, day: str
) -> None:
    ledger = Ledger(redis, {"c": 0.5}, clock=Clock())
    first = await ledger.hold("c", HAIKU, 0.1)
    assert isinstance(first, Hold)
    await ledger.settle(first, HAIKU, usage(0.6))
    started = asyncio.get_running_loop().time()
    refused = await ledger.hold("c", HAIKU, 0.1, wait_s=30.0)
    assert isinstance(refused, str)
    assert asyncio.get_running_loop().time() - started < 1.0


async def test_counters_hold_spend_tokens_and_the_budget(redis: Redis, day: str) -> None:
    ledger = Ledger(redis, {"c": 2.0}, clock=Clock())
    hold = await ledger.hold("c", HAIKU, 0.5)
    assert isinstance(hold, Hold)
    mid = parse_day(day, await redis.hgetall(spend_key(day)))  # type: ignore[misc]
    assert mid.chains["c"].reserved_usd == pytest.approx(0.5)
    assert mid.chains["c"].budget_usd == 2.0
    await ledger.settle(hold, HAIKU, Usage(7, 3, 100, 20, 0.123456789))
    spend = parse_day(day, await redis.hgetall(spend_key(day)))  # type: ignore[misc]
    assert spend.chains["c"].spent_usd == pytest.approx(0.123456789)
    assert spend.chains["c"].reserved_usd == 0
    assert spend.chains["c"].calls == 1
    model = spend.models[HAIKU.model]
    assert (model.calls, model.input_tokens, model.output_tokens) == (1, 7, 3)
    assert (model.cache_read_input_tokens, model.cache_creation_input_tokens) == (100, 20)
    assert model.cost_usd == pytest.approx(0.123456789)
    assert await redis.ttl(spend_key(day)) > 300 * 86_400


async def test_a_failed_call_releases_its_hold_and_counts_nothing(redis: Redis, day: str) -> None:
    ledger = Ledger(redis, {"c": 1.0}, clock=Clock())
    hold = await ledger.hold("c", HAIKU, 0.9)
    assert isinstance(hold, Hold)
    await ledger.settle(hold, HAIKU, None)
    await ledger.settle(hold, HAIKU, None)  # twice: the hold is released once only
    spend = parse_day(day, await redis.hgetall(spend_key(day)))  # type: ignore[misc]
    assert spend.chains["c"].reserved_usd == 0
    assert spend.chains["c"].spent_usd == 0
    assert HAIKU.model not in spend.models


async def test_a_dead_workers_hold_expires_after_its_deadline(redis: Redis, day: str) -> None:
    clock = Clock()
    ledger = Ledger(redis, {"c": 1.0}, clock=clock)
    assert isinstance(await ledger.hold("c", HAIKU, 1.0), Hold)  # and never settled
    assert isinstance(await ledger.hold("c", HAIKU, 0.1), str)
    clock.now += HAIKU.timeout + 31
    assert isinstance(await ledger.hold("c", HAIKU, 0.1), Hold)
    raw = await redis.hget(spend_key(day), "chain|c|reserved_nusd")  # type: ignore[misc]
    assert int(raw) == round(0.1 * NANO_USD)


async def test_concurrent_holds_never_admit_past_the_room_left(redis: Redis, day: str) -> None:
    """Forty holders at once on four ledgers (as four workers): at most the ones that
    fit below the budget when each was admitted, and the counters agree."""
    clock = Clock()
    workers = [Ledger(redis, {"c": 1.0}, clock=clock) for _ in range(4)]
    holds = await asyncio.gather(*(workers[i % 4].hold("c", HAIKU, 0.3) for i in range(40)))
    admitted = [h for h in holds if isinstance(h, Hold)]
    assert len(admitted) == 4  # 0, 0.3, 0.6, 0.9 are below 1.0; 1.2 is not
    await asyncio.gather(*(workers[0].settle(h, HAIKU, usage(0.3)) for h in admitted))
    spend = parse_day(day, await redis.hgetall(spend_key(day)))  # type: ignore[misc]
    assert spend.chains["c"].spent_usd == pytest.approx(1.2)  # the bound: one call's worst case
    assert spend.chains["c"].reserved_usd == 0


async def test_local_models_and_unbudgeted_chains_are_never_held(redis: Redis, day: str) -> None:
    ledger = Ledger(redis, {"c": 0.0}, clock=Clock())
    assert isinstance(await ledger.hold("c", HAIKU, 0.0), str)  # a zero budget: no cloud
    local = await ledger.hold("c", QWEN, 0.0)
    free = await ledger.hold("other", HAIKU, 5.0)
    assert isinstance(local, Hold)
    assert local.member is None
    assert isinstance(free, Hold)
    assert free.member is None
    await ledger.settle(local, QWEN, usage(0.0, tokens=50))
    spend = parse_day(day, await redis.hgetall(spend_key(day)))  # type: ignore[misc]
    assert spend.models[QWEN.model].input_tokens == 50
    assert spend.models[QWEN.model].cost_usd == 0


async def test_with_redis_away_the_call_goes_ahead_unheld() -> None:
    gone = Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    try:
        ledger = Ledger(gone, {"c": 1.0}, clock=Clock())
        hold = await ledger.hold("c", HAIKU, 0.5)
        assert isinstance(hold, Hold)
        assert hold.member is None
        await ledger.settle(hold, HAIKU, usage(0.1))  # logged, not raised
    finally:
        await gone.aclose()
