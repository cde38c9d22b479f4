"""Transient cloud failures retried on the same model, through litellm's real HTTP path.

The stub answers as Anthropic does: ``529 overloaded_error``, ``429 rate_limit_error``
with ``retry-after``, permanent 4xx; ``stub-fail:haiku=529x1`` fails the first call of
a request and lets the next be answered, so a retry can be seen to succeed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from llm_router.worker.router import Router
from llm_router.worker.settings import Settings
from llm_router_testing.stubs import StubServer

pytestmark = pytest.mark.integration

HAIKU = "anthropic/claude-haiku-4-5-20251001"
SONNET = "anthropic/claude-sonnet-4-6"
#: Anthropic's error type for each permanent status.
KIND = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
}


@pytest.fixture(scope="module")
def cloud() -> Iterator[StubServer]:
    with StubServer() as server:
        yield server


def router(url: str, *, timeout: float = 5.0, max_retries: int = 2) -> Router:
    model: dict[str, Any] = {"api_base": url, "api_key": "sk-ant-test", "breaker_failures": 1000}
    chain = [
        {"model": HAIKU, "timeout": timeout, "max_retries": max_retries, **model},
        {"model": SONNET, "timeout": 5.0, **model},
    ]
    return Router(Settings.model_validate({"chains": {"default": chain}}))


def calls_to(stub: StubServer, model: str, marker: str) -> int:
    return sum(
        1 for r in stub.requests if r.model == model.split("/", 1)[1] and marker in str(r.body)
    )


@pytest.mark.parametrize(
    ("directive", "least_ms"),
    [("stub-fail:haiku=429x1", 1000), ("stub-fail:haiku=529x1", 200)],
    ids=["429 retry-after 1", "529 backoff"],
)
async def test_a_transient_failure_is_retried_and_stays_on_haiku(
    cloud: StubServer, directive: str, least_ms: int
) -> None:
    marker = f"{directive} case {least_ms}"
    result = await router(cloud.url).route(marker)
    first = result.attempts[0]
    assert result.model_used == HAIKU, result.attempts
    assert first.retries == 1
    assert first.retry_error is not None
    assert ("rate_limit_error" if "429" in directive else "overloaded_error") in first.retry_error
    assert first.latency_ms >= least_ms  # it waited as the answer asked
    assert calls_to(cloud, HAIKU, marker) == 2
    assert calls_to(cloud, SONNET, marker) == 0


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413])
async def test_a_permanent_error_falls_back_at_once(cloud: StubServer, status: int) -> None:
    marker = f"stub-fail:haiku={status}x1 permanent"
    result = await router(cloud.url).route(marker)
    first = result.attempts[0]
    assert result.model_used == SONNET
    assert (first.outcome, first.retries) == ("rejected", 0)
    assert KIND[status] in (first.reason or "")
    assert calls_to(cloud, HAIKU, marker) == 1


async def test_a_retry_that_would_overrun_the_deadline_is_not_made(cloud: StubServer) -> None:
    marker = "stub-fail:haiku=429x1@5 overrun"  # asks for 5 s; the deadline is 2 s
    result = await router(cloud.url, timeout=2.0).route(marker)
    first = result.attempts[0]
    assert result.model_used == SONNET
    assert first.retries == 0
    assert first.latency_ms < 1500  # it did not sit out the deadline either
    assert calls_to(cloud, HAIKU, marker) == 1


async def test_retries_stop_at_max_retries(cloud: StubServer) -> None:
    marker = "stub-fail:haiku=529x9@0.1 persistent"
    result = await router(cloud.url, max_retries=2).route(marker)
    assert result.model_used == SONNET
    assert result.attempts[0].retries == 2
    assert calls_to(cloud, HAIKU, marker) == 3
    none = await router(cloud.url, max_retries=0).route(marker.replace("persistent", "zero"))
    assert none.attempts[0].retries == 0


async def test_usage_and_cost_of_each_attempt_from_litellms_price_map(
    cloud: StubServer,
) -> None:
    import litellm

    marker = "stub:haiku=refusal stub:sonnet=text what does this cost"
    result = await router(cloud.url).route(marker)
    refused, answered = result.attempts
    assert result.model_used == SONNET
    for attempt, model in ((refused, HAIKU), (answered, SONNET)):
        assert attempt.input_tokens is not None
        assert attempt.output_tokens is not None
        assert attempt.input_tokens > 0
        assert attempt.output_tokens > 0
        # The stub's token counts, priced the way litellm prices them (offline map).
        prompt, completion = litellm.cost_per_token(
            model=model,
            prompt_tokens=attempt.input_tokens,
            completion_tokens=attempt.output_tokens,
        )
        assert attempt.cost_usd == pytest.approx(prompt + completion, rel=1e-9)
        assert attempt.cost_usd > 0
    assert result.cost_usd == pytest.approx(refused.cost_usd + answered.cost_usd)
