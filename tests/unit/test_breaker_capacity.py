"""The circuit breaker and the capacity slots, on fakeredis (their Lua included).

Across real worker processes: tests/integration/test_local_model.py.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.asyncio import Redis

from llm_router.worker import breaker as breaker_module
from llm_router.worker.breaker import Breakers
from llm_router.worker.capacity import Busy, Capacity, Slot
from llm_router.worker.settings import ModelConfig

LOCAL = ModelConfig(model="ollama_chat/unit", timeout=1.0, breaker_failures=3, breaker_cooldown=0.3)


@pytest.fixture(params=["redis", "local"])
def shared(request: pytest.FixtureRequest, redis: Redis) -> Redis | None:
    """Each rule holds in Redis (shared) and within one process (no Redis)."""
    return redis if request.param == "redis" else None


async def test_three_unwell_failures_open_it_and_a_probe_closes_it(shared: Redis | None) -> None:
    breakers = Breakers(shared)
    for _ in range(2):
        assert (await breakers.admit(LOCAL)).skip_reason is None
        assert await breakers.record(LOCAL, "unwell", probe=False) is None
    assert await breakers.record(LOCAL, "unwell", probe=False) == "open"
    skipped = await breakers.admit(LOCAL)
    assert skipped.skip_reason is not None
    assert skipped.skip_reason.startswith("circuit open")
    await asyncio.sleep(0.35)  # the cool-down
    probe = await breakers.admit(LOCAL)
    assert probe.probe
    assert probe.skip_reason is None
    assert await breakers.record(LOCAL, "healthy", probe=True) == "closed"
    assert (await breakers.admit(LOCAL)).skip_reason is None


async def test_a_failed_probe_opens_it_again(shared: Redis | None) -> None:
    breakers = Breakers(shared)
    for _ in range(3):
        await breakers.record(LOCAL, "unwell", probe=False)
    await asyncio.sleep(0.35)
    assert (await breakers.admit(LOCAL)).probe
    assert await breakers.record(LOCAL, "unwell", probe=True) == "open"
    assert (await breakers.admit(LOCAL)).skip_reason is not None


async def test_an_answer_between_failures_resets_the_count(shared: Redis | None) -> None:
    breakers = Breakers(shared)
    await breakers.admit(LOCAL)
    for _ in range(2):
        await breakers.record(LOCAL, "unwell", probe=False)
    await breakers.admit(LOCAL)
    await breakers.record(LOCAL, "healthy", probe=False)
    for _ in range(2):
        assert await breakers.record(LOCAL, "unwell", probe=False) is None
    assert (await breakers.admit(LOCAL)).skip_reason is None


async def test_exactly_one_probe_across_workers(redis: Redis, fake_server: object) -> None:
    workers = [Breakers(redis) for _ in range(4)]  # four processes, one Redis
    for _ in range(3):
        await workers[0].record(LOCAL, "unwell", probe=False)
    await asyncio.sleep(0.35)
    admissions = await asyncio.gather(*(w.admit(LOCAL) for w in workers))
    assert sum(a.probe for a in admissions) == 1
    others = [a.skip_reason for a in admissions if not a.probe]
    assert all(r is not None and "probing" in r for r in others)


async def test_a_skip_costs_no_round_trip(redis: Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    breakers = Breakers(redis)
    for _ in range(3):
        await breakers.record(LOCAL, "unwell", probe=False)

    async def no_redis(*args: object, **kwargs: object) -> object:
        raise AssertionError("admit went to Redis while the breaker is known open")

    monkeypatch.setattr(breakers, "_admit", no_redis)
    started = time.perf_counter()
    for _ in range(1000):
        assert (await breakers.admit(LOCAL)).skip_reason is not None
    assert time.perf_counter() - started < 1.0  # well under 1 ms a skip


async def test_a_vanished_probe_lets_the_next_job_probe(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(breaker_module, "PROBE_MARGIN_S", 0.0)
    quick = LOCAL.model_copy(update={"timeout": 0.1})
    first, second = Breakers(redis), Breakers(redis)
    for _ in range(3):
        await first.record(quick, "unwell", probe=False)
    await asyncio.sleep(0.35)
    assert (await first.admit(quick)).probe  # and then its worker dies
    await asyncio.sleep(0.15)
    assert (await second.admit(quick)).probe


# -- capacity ----------------------------------------------------------------------------


ONE_SLOT = ModelConfig(model="ollama_chat/slots", timeout=1.0, max_in_flight=1, max_wait=1.0)


async def test_a_model_without_a_limit_needs_no_slot(shared: Redis | None) -> None:
    assert await Capacity(shared).acquire(LOCAL) is None


async def test_one_slot_is_held_by_one_job_at_a_time(shared: Redis | None) -> None:
    capacity = Capacity(shared)
    inside, peak = 0, 0

    async def job() -> None:
        nonlocal inside, peak
        slot = await capacity.acquire(ONE_SLOT)
        assert isinstance(slot, Slot)
        inside += 1
        peak = max(peak, inside)
        await asyncio.sleep(0.02)
        inside -= 1
        await capacity.release(slot)

    await asyncio.gather(*(job() for _ in range(8)))
    assert peak == 1
    await capacity.aclose()


async def test_waiters_are_served_first_come_first_served(redis: Redis) -> None:
    processes = [Capacity(redis) for _ in range(3)]
    first = await processes[0].acquire(ONE_SLOT)
    assert isinstance(first, Slot)
    order: list[int] = []

    async def wait(n: int) -> None:
        slot = await processes[n % 3].acquire(ONE_SLOT)
        assert isinstance(slot, Slot)
        order.append(n)
        await asyncio.sleep(0.01)
        await processes[n % 3].release(slot)

    waiters = []
    for n in range(6):
        waiters.append(asyncio.create_task(wait(n)))
        await asyncio.sleep(0.02)  # each is in line before the next arrives
    await processes[0].release(first)
    await asyncio.gather(*waiters)
    assert order == list(range(6))
    for capacity in processes:
        await capacity.aclose()


async def test_interactive_waiters_go_ahead_of_batch_waiters(redis: Redis) -> None:
    processes = [Capacity(redis) for _ in range(2)]
    first = await processes[0].acquire(ONE_SLOT, batch=True)
    assert isinstance(first, Slot)
    order: list[str] = []

    async def wait(name: str, batch: bool) -> None:
        capacity = processes[len(order) % 2]
        slot = await capacity.acquire(ONE_SLOT, batch=batch)
        assert isinstance(slot, Slot)
        order.append(name)
        await asyncio.sleep(0.01)
        await capacity.release(slot)

    # Three batch jobs queue up first; two interactive ones arrive after them.
    arrivals = [("b1", True), ("b2", True), ("i1", False), ("b3", True), ("i2", False)]
    waiters = []
    for name, batch in arrivals:
        waiters.append(asyncio.create_task(wait(name, batch)))
        await asyncio.sleep(0.02)
    await processes[0].release(first)
    await asyncio.gather(*waiters)
    assert order == ["i1", "i2", "b1", "b2", "b3"]
    for capacity in processes:
        await capacity.aclose()


async def test_max_wait_gives_busy(shared: Redis | None) -> None:
    capacity = Capacity(shared)
    short = ONE_SLOT.model_copy(update={"max_wait": 0.1})
    held = await capacity.acquire(short)
    assert isinstance(held, Slot)
    started = time.monotonic()
    busy = await capacity.acquire(short)
    assert isinstance(busy, Busy)
    assert busy.reason.startswith("busy: waited 0.1")
    assert 0.09 < time.monotonic() - started < 1.0
    await capacity.release(held)
    assert isinstance(await capacity.acquire(short), Slot)
    await capacity.aclose()


async def test_an_expected_wait_beyond_max_wait_moves_on_at_once(redis: Redis) -> None:
    capacity = Capacity(redis)
    patient = ONE_SLOT.model_copy(update={"max_wait": 1.2})
    for _ in range(5):  # the model's recent calls took 0.5 s each
        slot = await capacity.acquire(patient)
        assert isinstance(slot, Slot)
        slot.started -= 0.5
        await capacity.release(slot)
    held = await capacity.acquire(patient)
    ahead = [asyncio.create_task(capacity.acquire(patient)) for _ in range(2)]
    await asyncio.sleep(0.05)  # both wait: 0.5 s and 1.0 s expected, under 1.2 s
    started = time.monotonic()
    busy = await capacity.acquire(patient)  # 2 ahead, then its own turn: 1.5 s > 1.2 s
    assert isinstance(busy, Busy)
    assert "2 ahead for 1 slot, expected wait 1.5s > max_wait 1.2s" in busy.reason
    assert time.monotonic() - started < 0.3
    assert isinstance(held, Slot)
    await capacity.release(held)
    for task in ahead:
        slot = await task
        assert isinstance(slot, Slot)
        await capacity.release(slot)
    await capacity.aclose()


async def test_a_dead_holder_frees_its_slot_within_its_lease(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llm_router.worker import capacity as capacity_module

    monkeypatch.setattr(capacity_module, "LEASE_MARGIN_S", 0.0)
    quick = ONE_SLOT.model_copy(update={"timeout": 0.2, "max_wait": 2.0})
    dead, alive = Capacity(redis), Capacity(redis)
    assert isinstance(await dead.acquire(quick), Slot)  # never released: its worker died
    started = time.monotonic()
    slot = await alive.acquire(quick)
    assert isinstance(slot, Slot)
    assert 0.1 < time.monotonic() - started < 1.5  # the 0.2 s lease, then the safety poll
    await alive.aclose()
