"""The cloud leg through worker processes: retries, usage and cost, the daily budget,
prompt caching and ``llm-router costs`` — real Redis, two workers, the stub over HTTP.

Chain names carry a per-run suffix: the spend counters are one hash per UTC day that
every run on this Redis adds to.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import litellm
import pytest
from redis.asyncio import Redis

from llm_router.client import RouterClient
from llm_router.client.keys import METRICS_CHANNEL, spend_key
from llm_router.client.protocol import RouteResult
from llm_router.client.spend import NANO_USD, utc_day
from llm_router.worker.costs import worst_case_usd
from llm_router_testing.stubs import StubServer
from tests.integration.conftest import REDIS_URL
from tests.integration.fleet import Fleet
from tests.integration.test_routing import next_event

pytestmark = pytest.mark.integration

QWEN = "ollama_chat/qwen2.5:7b"
HAIKU = "anthropic/claude-haiku-4-5-20251001"
SONNET = "anthropic/claude-sonnet-4-6"
RUN = uuid.uuid4().hex[:8]
CLOUD, CAPPED, CACHED = f"cloud_{RUN}", f"capped_{RUN}", f"cached_{RUN}"
#: Small enough for a few dozen stub calls, and the answer's cap keeps holds near it.
BUDGET_USD = 0.002
MAX_TOKENS = 64


def chains(url: str) -> dict[str, Any]:
    quiet = {"api_base": url, "breaker_failures": 1000}
    cloud = {**quiet, "api_key": "sk-ant-test", "timeout": 5.0}
    local = {"model": QWEN, "timeout": 2.0, **quiet}
    two = [{"model": HAIKU, **cloud}, {"model": SONNET, **cloud}]
    return {
        "default": [local, *two],
        CLOUD: two,
        CAPPED: [local, *two],
        CACHED: [{"model": HAIKU, "cache_prompt": True, **cloud}],
    }


@pytest.fixture(scope="module")
def cloud_stub() -> Iterator[StubServer]:
    with StubServer() as server:
        yield server


@pytest.fixture(scope="module")
def fleet(
    redis_available: str, cloud_stub: StubServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    fleet = Fleet(
        tmp_path_factory.mktemp("costs"),
        redis_available,
        chains=json.dumps(chains(cloud_stub.url)),
        budgets=json.dumps({CAPPED: BUDGET_USD}),
        anthropic_max_tokens=str(MAX_TOKENS),
        max_jobs="20",
        poll_delay="0.05",
    )
    fleet.spawn(2)
    yield fleet
    fleet.stop()


@pytest.fixture
async def producer(fleet: Fleet) -> AsyncIterator[RouterClient]:
    async with RouterClient(REDIS_URL, queue_name=fleet.queue) as client:
        yield client


async def day_counters(redis: Redis) -> dict[str, int]:
    raw: dict[bytes, bytes] = await redis.hgetall(spend_key(utc_day()))  # type: ignore[misc]
    return {k.decode(): int(v) for k, v in raw.items()}


def tag() -> str:
    return uuid.uuid4().hex


@pytest.mark.parametrize(
    ("directive", "error"),
    [("stub-fail:haiku=429x1", "rate_limit_error"), ("stub-fail:haiku=529x1@0.2", "overloaded")],
    ids=["429 retry-after 1", "529"],
)
async def test_a_transient_error_is_retried_in_the_worker_and_the_job_stays_on_haiku(
    producer: RouterClient, cloud_stub: StubServer, directive: str, error: str
) -> None:
    marker = tag()
    result = await producer.route(f"{directive} {marker}", chain=CLOUD, timeout=30)
    (attempt,) = result.attempts
    assert result.model_used == HAIKU
    assert attempt.retries == 1
    assert error in (attempt.retry_error or "")
    haiku_calls = [
        r for r in cloud_stub.requests if marker in str(r.body) and "haiku" in str(r.model)
    ]
    assert len(haiku_calls) == 2


@pytest.mark.parametrize(
    ("status", "kind"), [(401, "authentication_error"), (404, "not_found_error")]
)
async def test_a_permanent_error_falls_back_at_once(
    producer: RouterClient, cloud_stub: StubServer, status: int, kind: str
) -> None:
    marker = tag()
    result = await producer.route(f"stub-fail:haiku={status}x1 {marker}", chain=CLOUD, timeout=30)
    first = result.attempts[0]
    assert result.model_used == SONNET
    assert (first.outcome, first.retries) == ("rejected", 0)
    assert kind in (first.reason or "")
    assert first.cost_usd == 0  # a refused call is not billed
    assert sum(marker in str(r.body) and "haiku" in str(r.model) for r in cloud_stub.requests) == 1


async def test_a_retry_that_would_overrun_the_deadline_is_not_made(
    producer: RouterClient, cloud_stub: StubServer
) -> None:
    marker = tag()  # the stub asks for 8 s; Haiku's deadline is 5 s
    result = await producer.route(f"stub-fail:haiku=429x1@8 {marker}", chain=CLOUD, timeout=30)
    first = result.attempts[0]
    assert result.model_used == SONNET
    assert first.retries == 0
    assert first.latency_ms < 2000  # it fell back at once, not at the deadline
    assert sum(marker in str(r.body) and "haiku" in str(r.model) for r in cloud_stub.requests) == 1


async def test_usage_and_cost_in_attempts_result_event_and_counters(
    producer: RouterClient, redis: Redis
) -> None:
    before = await day_counters(redis)
    pubsub = redis.pubsub()
    await pubsub.subscribe(METRICS_CHANNEL)
    try:
        handle = await producer.enqueue(f"stub:qwen=refusal what does it cost {tag()}")
        result = await handle.result(timeout=30)
        event = await next_event(pubsub, handle.job_id)
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    local, haiku = result.attempts
    assert result.model_used == HAIKU
    assert local.cost_usd == 0
    assert local.input_tokens
    assert local.input_tokens > 0
    assert haiku.input_tokens
    assert haiku.output_tokens
    prompt, completion = litellm.cost_per_token(
        model=HAIKU, prompt_tokens=haiku.input_tokens, completion_tokens=haiku.output_tokens
    )
    assert haiku.cost_usd == pytest.approx(prompt + completion, rel=1e-9)
    assert haiku.cost_usd == pytest.approx(haiku.input_tokens * 1e-6 + haiku.output_tokens * 5e-6)
    assert result.cost_usd == pytest.approx(haiku.cost_usd)
    assert event["cost_usd"] == pytest.approx(result.cost_usd)
    assert event["attempts"][1]["cost_usd"] == pytest.approx(haiku.cost_usd)
    assert event["attempts"][1]["input_tokens"] == haiku.input_tokens
    after = await day_counters(redis)

    def delta(field: str) -> int:
        return after.get(field, 0) - before.get(field, 0)

    assert delta(f"model|{HAIKU}|calls") == 1
    assert delta(f"model|{HAIKU}|input_tokens") == haiku.input_tokens
    assert delta(f"model|{HAIKU}|output_tokens") == haiku.output_tokens
    assert delta(f"model|{HAIKU}|cost_nusd") == round(haiku.cost_usd * NANO_USD)
    assert delta(f"model|{QWEN}|calls") == 1
    assert delta(f"model|{QWEN}|input_tokens") == local.input_tokens
    assert delta(f"model|{QWEN}|cost_nusd") == 0
    assert delta("chain|default|spent_nusd") == round(haiku.cost_usd * NANO_USD)


async def test_a_budget_reached_mid_run_skips_the_cloud_across_two_workers(
    producer: RouterClient, redis: Redis, fleet: Fleet
) -> None:
    """Cloud jobs (the local model refuses them) beside local ones, on two workers."""
    prompts = [
        f"stub:qwen=refusal cloud job {i} {tag()}" if i % 2 else f"local job {i} {tag()}"
        for i in range(120)
    ]
    handles = await asyncio.gather(*(producer.enqueue(p, chain=CAPPED) for p in prompts))
    results: list[RouteResult] = await asyncio.gather(
        *(h.result(timeout=60, raise_on_failure=False) for h in handles)
    )
    local = [r for i, r in enumerate(results) if i % 2 == 0]
    cloud = [r for i, r in enumerate(results) if i % 2]
    assert all(r.model_used == QWEN for r in local)  # local answers go on
    answered = [r for r in cloud if r.ok]
    capped = [r for r in cloud if not r.ok]
    assert answered, "some cloud jobs should be answered before the budget is reached"
    assert capped, "the budget should be reached mid-run"
    for r in capped:
        assert [a.outcome for a in r.attempts] == ["rejected", "skipped", "skipped"]
        assert all((a.reason or "").startswith("budget") for a in r.attempts[1:])
        # Skipped because the budget was spent, not because calls in flight held it.
        spent_then = re.search(r"has spent \$([\d.]+) of", r.attempts[1].reason or "")
        assert spent_then is not None
        assert float(spent_then[1]) >= BUDGET_USD
    skipped_by = {w.worker_id for r in capped for w in fleet.routed(r.job_id or "")}
    assert len(skipped_by) == 2, "both workers should see the shared spend"

    counters = await day_counters(redis)
    spent = counters[f"chain|{CAPPED}|spent_nusd"] / NANO_USD
    assert spent == pytest.approx(sum(r.cost_usd for r in cloud), abs=1e-8)
    assert spent >= BUDGET_USD * 0.8  # it was used, not refused early
    # The bound the README states: one call's worst case beyond the budget.
    longest = max(len(p) for p in prompts) + 200
    assert spent <= BUDGET_USD + worst_case_usd(SONNET, longest, MAX_TOKENS)
    assert counters[f"chain|{CAPPED}|reserved_nusd"] == 0  # every hold was settled
    assert counters[f"chain|{CAPPED}|budget_nusd"] == round(BUDGET_USD * NANO_USD)


async def test_cache_prompt_marks_the_system_block_and_reads_are_cheaper(
    producer: RouterClient, cloud_stub: StubServer
) -> None:
    system = f"You label support tickets by topic. {tag()} " + "Rules follow. " * 1500
    results = [
        await producer.route(
            [{"role": "system", "content": system}, {"role": "user", "content": f"ticket {i}"}],
            chain=CACHED,
            timeout=30,
        )
        for i in range(2)
    ]
    bodies = [r.body for r in cloud_stub.requests if isinstance(r.body, dict)]
    sent = [b for b in bodies if system[:60] in str(b.get("system"))]
    assert len(sent) == 2
    assert sent[0]["system"][-1]["cache_control"] == {"type": "ephemeral"}
    wrote, read = (r.attempts[0] for r in results)
    assert wrote.cache_creation_input_tokens
    assert wrote.cache_creation_input_tokens > 4096
    assert read.cache_read_input_tokens == wrote.cache_creation_input_tokens
    assert read.cache_creation_input_tokens == 0
    cached = wrote.cache_creation_input_tokens
    # Haiku 4.5: writes at 1.25x, reads at 0.1x the $1/MTok input price.
    assert wrote.cost_usd - read.cost_usd == pytest.approx(cached * (1.25e-6 - 0.1e-6), rel=1e-6)
    assert read.cost_usd < wrote.cost_usd / 5


async def test_costs_command_reports_the_days_spend(producer: RouterClient, tmp_path: Path) -> None:
    await producer.route(f"stub:qwen=refusal for the report {tag()}", chain=CLOUD, timeout=30)
    run = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "llm_router.client.cli",
            "--redis-url",
            REDIS_URL,
            "costs",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    days = json.loads(run.stdout)
    assert len(days) == 7
    today = days[0]
    assert today["day"] == utc_day()
    assert today["chains"][CLOUD]["spent_usd"] > 0
    assert today["chains"][CLOUD]["budget_usd"] is None
    assert today["models"][HAIKU]["calls"] >= 1
    table = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "llm_router.client.cli", "--redis-url", REDIS_URL, "costs"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "200", "PATH": ""},
    )
    assert table.returncode == 0, table.stderr
    assert CLOUD in table.stdout
    assert "Usage per model" in table.stdout
