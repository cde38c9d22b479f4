"""The local model used well, across real worker processes and a stub that serves like Ollama.

Capacity slots shared by several workers, their leases when a worker is killed,
``max_wait``; the circuit breaker opening, letting one probe through across
workers, closing, and not minding refusals; the warm-up and ``keep_alive``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from llm_router.client import RouterClient
from llm_router.client.protocol import RouteResult
from llm_router_testing.stubs import Behaviour, StubServer
from tests.integration.conftest import REDIS_URL
from tests.integration.fleet import Fleet, wait_for_holder

pytestmark = pytest.mark.integration

LOCAL = "ollama_chat/qwen2.5:7b"
HAIKU = "anthropic/claude-haiku-4-5-20251001"
KEY = {"api_key": "sk-ant-test-secret-0123456789"}


def chains(url: str, **local: Any) -> str:
    model = {"model": LOCAL, "timeout": 3.0, "api_base": url, **local}
    cloud = {"model": HAIKU, "timeout": 3.0, "api_base": url, **KEY}
    return json.dumps({"default": [model, cloud]})


@pytest.fixture
def ollama() -> Iterator[StubServer]:
    """A stub of its own per test: one request at a time, like Ollama's default."""
    with StubServer(ollama_parallel=1, ollama_delay=0.1) as server:
        yield server


def fleet_for(tmp_path: Path, url: str, **local: Any) -> Fleet:
    return Fleet(tmp_path, REDIS_URL, chains=chains(url, **local), poll_delay="0.05", max_jobs="20")


@pytest.fixture
async def client_for() -> AsyncIterator[Any]:
    clients: list[RouterClient] = []

    def make(fleet: Fleet) -> RouterClient:
        client = RouterClient(REDIS_URL, queue_name=fleet.queue, fallback_poll=0.2)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


async def route_all(client: RouterClient, n: int, prompt: str = "hi") -> list[RouteResult]:
    handles = [await client.enqueue(f"{prompt} {i}") for i in range(n)]
    return [await h.result(timeout=60, raise_on_failure=False) for h in handles]


def chat_bodies(stub: StubServer) -> list[dict[str, Any]]:
    return [r.body for r in stub.requests if r.path == "/api/chat" and isinstance(r.body, dict)]


async def test_the_slot_limit_holds_across_three_workers(
    ollama: StubServer, tmp_path: Path, client_for: Any
) -> None:
    fleet = fleet_for(tmp_path, ollama.url, max_in_flight=1, max_wait=30)
    try:
        fleet.spawn(3)
        ollama.reset_peak()
        results = await route_all(client_for(fleet), 15)
    finally:
        fleet.stop()
    assert all(r.ok for r in results)
    assert {r.model_used for r in results} == {LOCAL}  # every job waited for the local model
    assert ollama.peak_in_flight == 1  # never two requests at the one-at-a-time model
    working = {w.worker_id for w in fleet.workers for e in w.events("routed")}
    assert len(working) >= 2  # the jobs really were spread over the workers


async def test_without_a_limit_the_burst_floods_the_local_model(
    ollama: StubServer, tmp_path: Path, client_for: Any
) -> None:
    """The problem the limit solves, measured the same way (the seed's behaviour)."""
    fleet = fleet_for(tmp_path, ollama.url)
    try:
        fleet.spawn(2)
        ollama.reset_peak()
        results = await route_all(client_for(fleet), 15)
    finally:
        fleet.stop()
    assert all(r.ok for r in results)
    assert ollama.peak_in_flight > 1


async def test_max_wait_expiry_is_skipped_busy_and_falls_back(
    ollama: StubServer, tmp_path: Path, client_for: Any
) -> None:
    ollama.set_ollama(delay=1.5)
    fleet = fleet_for(tmp_path, ollama.url, max_in_flight=1, max_wait=0.3)
    try:
        fleet.spawn(1)
        results = await route_all(client_for(fleet), 2)
    finally:
        fleet.stop()
    by_model = sorted(results, key=lambda r: r.model_used)
    local, cloud = by_model[1], by_model[0]
    assert local.model_used == LOCAL
    assert cloud.model_used == HAIKU
    skipped = cloud.attempts[0]
    assert skipped.model == LOCAL
    assert skipped.outcome == "skipped"
    assert skipped.reason is not None
    assert skipped.reason.startswith("busy: waited 0.3")
    assert 250 <= skipped.latency_ms < 1500


async def test_a_killed_worker_frees_its_slot_within_its_lease(
    ollama: StubServer, tmp_path: Path, client_for: Any, redis: Redis
) -> None:
    # One job a worker, so the two jobs land on two workers; the slot's lease is the
    # model's timeout (1 s) + 5 s from the moment the first job took it.
    fleet = Fleet(
        tmp_path,
        REDIS_URL,
        chains=chains(ollama.url, max_in_flight=1, max_wait=20, timeout=1.0),
        poll_delay="0.05",
        max_jobs="1",
    )
    try:
        fleet.spawn(2)
        client = client_for(fleet)
        ollama.set_behaviour("qwen", Behaviour.HANG)
        holder = await client.enqueue("this call holds the slot until its worker dies")
        deadline = time.monotonic() + 10
        while not [r for r in ollama.requests if r.behaviour is Behaviour.HANG]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        taken = time.monotonic()
        ollama.reset_behaviours()
        waiter = await client.enqueue("this one waits for the slot on the other worker")
        victim_id, _ = await wait_for_holder(redis, holder.job_id)
        fleet.by_id(victim_id).kill()  # SIGKILL while holding the slot: nothing given back
        result = await waiter.result(timeout=60)
        took = time.monotonic() - taken
    finally:
        fleet.stop()
    assert result.model_used == LOCAL
    assert result.attempts[0].outcome == "success"
    assert 5.0 < took < 6.0 + 3.0  # freed when the lease ran out: not before, nor much after


async def test_the_breaker_opens_skips_lets_one_probe_through_and_closes(
    ollama: StubServer, tmp_path: Path, client_for: Any
) -> None:
    fleet = fleet_for(tmp_path, ollama.url, breaker_failures=3, breaker_cooldown=1.5)
    try:
        fleet.spawn(2)
        client = client_for(fleet)
        ollama.set_behaviour("qwen", Behaviour.HTTP_500)
        for i in range(3):  # three unwell failures in a row, whichever worker ran them
            failed = await client.route(f"fail {i}", timeout=30)
            assert failed.attempts[0].outcome == "rejected"
        skipped = await client.route("while it is open", timeout=30)
        assert skipped.attempts[0].outcome == "skipped"
        assert skipped.attempts[0].reason is not None
        assert skipped.attempts[0].reason.startswith("circuit open")
        # A skip costs no model call and no round trip (bench/local_model.py: 0 ms); the
        # bound here leaves room for a busy test machine.
        assert skipped.attempts[0].latency_ms <= 25
        assert skipped.model_used == HAIKU
        ollama.reset_behaviours()
        ollama.set_ollama(delay=1.5)  # the probe takes a while: the others see half-open
        await asyncio.sleep(1.6)
        before = len(chat_bodies(ollama))
        burst = await route_all(client, 8, "after the cool-down")
        probes = [b for b in chat_bodies(ollama)[before:] if b.get("messages")]
        await asyncio.sleep(0.6)  # the other worker looks again after PROBING_RECHECK_S
        after = await client.route("closed again", timeout=30)
    finally:
        fleet.stop()
    assert len(probes) == 1  # exactly one probe across both workers
    assert sum(r.model_used == LOCAL for r in burst) == 1
    assert all(r.ok for r in burst)
    assert after.model_used == LOCAL
    opened = sum(len(w.events("breaker_open")) for w in fleet.workers)
    half = sum(len(w.events("breaker_half_open")) for w in fleet.workers)
    closed = sum(len(w.events("breaker_closed")) for w in fleet.workers)
    assert (opened, half, closed) == (1, 1, 1)  # each change logged once, by one worker


async def test_refusals_and_bad_answers_never_open_the_breaker(
    ollama: StubServer, tmp_path: Path, client_for: Any
) -> None:
    fleet = fleet_for(tmp_path, ollama.url, breaker_failures=2, breaker_cooldown=30)
    try:
        fleet.spawn(1)
        client = client_for(fleet)
        ollama.set_behaviour("qwen", Behaviour.REFUSAL)
        results = [await client.route(f"refuse {i}", timeout=30) for i in range(5)]
    finally:
        fleet.stop()
    assert [r.attempts[0].outcome for r in results] == ["rejected"] * 5  # called every time
    assert all(w.events("breaker_open") == [] for w in fleet.workers)


async def test_the_warm_up_reaches_the_model_first_and_every_call_keeps_it_alive(
    ollama: StubServer, tmp_path: Path, client_for: Any
) -> None:
    ollama.set_ollama(cold_load=1.2)
    fleet = fleet_for(tmp_path, ollama.url, timeout=3.0)
    try:
        [worker] = fleet.spawn(1)
        deadline = time.monotonic() + 10
        while not worker.events("model_warm"):
            assert time.monotonic() < deadline, worker.log_text()
            await asyncio.sleep(0.05)
        first_job = await client_for(fleet).route("the first job", timeout=30)
        ollama.unload()
        cold_job = await client_for(fleet).route("after an unload", timeout=30)
    finally:
        fleet.stop()
    bodies = chat_bodies(ollama)
    assert bodies[0]["messages"] == []  # the load-only request came before any job
    assert all(b.get("keep_alive") == -1 for b in bodies)  # warm-up and calls alike
    [warm] = worker.events("model_warm")
    assert warm["load_ms"] >= 1000
    assert first_job.attempts[0].load_ms is not None
    assert first_job.attempts[0].load_ms < 1000  # warm: the job did not pay the load
    assert cold_job.attempts[0].load_ms is not None
    assert cold_job.attempts[0].load_ms >= 1000
    assert [e.get("during") for e in worker.events("cold_load")] == ["warm-up", None]
