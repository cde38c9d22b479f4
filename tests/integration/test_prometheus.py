"""``/metrics`` of a real worker after routing known jobs: the values match what happened."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from llm_router.client import RouterClient
from llm_router_testing.servers import free_port
from llm_router_testing.stubs import StubServer
from tests.integration.conftest import REDIS_URL, WorkerProcess, chain_env, worker_env

pytestmark = pytest.mark.integration

QWEN = "ollama_chat/qwen2.5:7b"
HAIKU = "anthropic/claude-haiku-4-5-20251001"
ALERTS = Path(__file__).parents[2] / "deploy" / "alerts.yml"
CHAIN = f"scrape_{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def scraped_worker(
    redis_available: str, stub: StubServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[WorkerProcess, str, str]]:
    port = free_port()
    queue = f"llm_router:test:prom:{uuid.uuid4().hex[:6]}"
    chains = json.loads(chain_env(stub.url))
    chains[CHAIN] = chains["default"]
    env = worker_env(
        redis_url=redis_available,
        queue_name=queue,
        chains=json.dumps(chains),
        budgets=json.dumps({CHAIN: 3.0}),
        metrics_port=str(port),
        poll_delay="0.05",
    )
    worker = WorkerProcess(env, tmp_path_factory.mktemp("prom") / "worker.log").start()
    yield worker, f"http://127.0.0.1:{port}/metrics", queue
    worker.stop()


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(url, timeout=5).text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in values, f"{key} twice: Prometheus rejects the scrape"
            values[key] = sample.value
    assert not any(name.endswith("_created") for name, _ in values)
    return values


def value(
    values: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return values.get((name, frozenset(labels.items())), 0.0)


async def test_scrape_after_routing_matches_what_happened(
    scraped_worker: tuple[WorkerProcess, str, str],
) -> None:
    _, url, queue = scraped_worker
    async with RouterClient(REDIS_URL, queue_name=queue) as client:
        local = await client.route(f"local answer {uuid.uuid4().hex}", chain=CHAIN)
        cloud = await client.route(f"stub:qwen=refusal cloud {uuid.uuid4().hex}", chain=CHAIN)
        handle = await client.enqueue("x", chain="no-such-chain")
        bad = await handle.result(timeout=20, raise_on_failure=False)
    assert (local.model_used, cloud.model_used, bad.status) == (QWEN, HAIKU, "invalid_request")
    m = scrape(url)
    assert value(m, "llm_router_jobs_total", chain=CHAIN, status="ok") == 2
    assert value(m, "llm_router_jobs_total", chain="no-such-chain", status="invalid_request") == 1
    assert value(m, "llm_router_attempts_total", model=QWEN, outcome="success") == 1
    assert value(m, "llm_router_attempts_total", model=QWEN, outcome="rejected") == 1
    assert value(m, "llm_router_attempts_total", model=HAIKU, outcome="success") == 1
    assert value(m, "llm_router_job_duration_seconds_count", chain=CHAIN) == 2
    assert value(m, "llm_router_attempt_duration_seconds_count", model=QWEN) == 2
    haiku = cloud.attempts[1]
    assert value(m, "llm_router_cost_usd_total", model=HAIKU) == pytest.approx(haiku.cost_usd)
    assert value(m, "llm_router_tokens_total", model=HAIKU, kind="output") == haiku.output_tokens
    assert value(m, "llm_router_jobs_in_flight", queue=queue) == 0
    closed = value(
        m, "llm_router_breaker_state", model=QWEN, deployment="", local="true", state="closed"
    )
    assert closed == 1
    assert value(m, "llm_router_budget_usd", chain=CHAIN) == 3.0
    assert value(m, "process_resident_memory_bytes") > 0


async def test_shared_values_come_from_redis(
    scraped_worker: tuple[WorkerProcess, str, str],
) -> None:
    _, url, queue = scraped_worker
    async with RouterClient(REDIS_URL, queue_name=queue) as client:
        result = await client.route(f"stub:qwen=refusal spend {uuid.uuid4().hex}", chain=CHAIN)
    assert result.cost_usd > 0
    for _ in range(40):  # the shared values are read every 5 s
        m = scrape(url)
        if value(m, "llm_router_spend_today_usd", chain=CHAIN) >= result.cost_usd:
            break
        await asyncio.sleep(0.25)
    assert value(m, "llm_router_spend_today_usd", chain=CHAIN) >= result.cost_usd
    assert value(m, "llm_router_live_workers") >= 1
    # Message Batches: shared counts, served whether or not a model uses them.
    assert ("llm_router_parked_jobs", frozenset()) in m
    assert ("llm_router_open_batches", frozenset()) in m
    assert ("llm_router_queue_depth", frozenset({("queue", queue), ("lane", "interactive")})) in m
    assert value(m, "llm_router_shared_outcomes", model=HAIKU, outcome="success") >= 1


def test_every_alert_names_series_the_worker_serves(
    scraped_worker: tuple[WorkerProcess, str, str],
) -> None:
    _, url, _ = scraped_worker
    names = {name for name, _ in scrape(url)}
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    assert {r["alert"] for r in rules} >= {
        "LLMRouterNoLiveWorker",
        "LLMRouterQueueNotDraining",
        "LLMRouterLocalModelBreakerOpen",
        "LLMRouterCloudSpendNearBudget",
        "LLMRouterRedisMemoryHigh",
        "LLMRouterRedisMayEvict",
    }
    for rule in rules:
        for series in re.findall(r"\bllm_router_\w+", rule["expr"]):
            assert series in names, f"{rule['alert']} uses {series}, which /metrics lacks"
