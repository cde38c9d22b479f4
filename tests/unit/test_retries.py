"""Which failures are retried on the same model, and after how long."""

from __future__ import annotations

import email.utils
import random
import time

import httpx
import litellm
import pytest

from llm_router.worker.retries import MAX_BACKOFF_S, backoff, header_delay, retry_delay


def provider_error(status: int, message: str = "stub", **headers: str) -> Exception:
    """What litellm raises for an HTTP error, with the answer's headers."""
    response = httpx.Response(status, request=httpx.Request("POST", "http://127.0.0.1/v1"))
    exc = litellm.exceptions.APIError(
        status_code=status, message=message, llm_provider="anthropic", model="claude",
        response=response,
    )  # fmt: skip
    exc.litellm_response_headers = httpx.Headers(headers)  # type: ignore[attr-defined]
    return exc


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504, 529])
def test_transient_statuses_are_retried(status: int) -> None:
    delay = retry_delay(provider_error(status), 0)
    assert delay is not None
    assert 0.25 <= delay <= 0.5  # the first backoff, jittered


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413])
def test_what_cannot_get_better_is_not_retried(status: int) -> None:
    assert retry_delay(provider_error(status, **{"retry-after": "1"}), 0) is None


def test_the_servers_wait_wins_over_the_backoff() -> None:
    assert retry_delay(provider_error(429, **{"retry-after": "2"}), 0) == 2.0
    assert retry_delay(provider_error(529, **{"retry-after-ms": "1500"}), 3) == 1.5


def test_a_spend_limit_without_retry_after_is_not_waited_for() -> None:
    spent = provider_error(429, "Your organization has reached its monthly spend limit")
    assert retry_delay(spent, 0) is None
    plain = provider_error(429, "Number of request tokens has exceeded your per-minute rate limit")
    assert retry_delay(plain, 0) is not None


def test_timeouts_are_not_retried_connection_resets_are() -> None:
    assert retry_delay(TimeoutError(), 0) is None
    assert retry_delay(ConnectionResetError(), 0) is not None


def test_retry_after_forms() -> None:
    assert header_delay({"Retry-After": "3"}) == 3.0
    assert header_delay({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert header_delay({"retry-after": "soon"}) is None
    assert header_delay(None) is None
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    delay = header_delay({"retry-after": when})
    assert delay is not None
    assert 25 < delay <= 30


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    rng = random.Random(7)
    waits = [backoff(n, rng) for n in range(8)]
    assert all(0.5 * min(MAX_BACKOFF_S, 0.5 * 2**n) <= w for n, w in enumerate(waits))
    assert max(waits) <= MAX_BACKOFF_S
    assert waits[3] > waits[0]


def test_cloud_models_retry_twice_local_ones_not_unless_told() -> None:
    from llm_router.worker.settings import ModelConfig

    assert ModelConfig(model="anthropic/claude-haiku-4-5-20251001", timeout=30).retries == 2
    assert ModelConfig(model="ollama_chat/qwen2.5:7b", timeout=8).retries == 0
    assert ModelConfig(model="ollama_chat/qwen2.5:7b", timeout=8, max_retries=1).retries == 1
    with pytest.raises(ValueError, match="less than or equal to 10"):
        ModelConfig(model="anthropic/x", timeout=1, max_retries=11)


def test_usage_excludes_the_cached_part_and_local_models_are_free() -> None:
    from types import SimpleNamespace

    from llm_router.worker.costs import usage_of

    usage = SimpleNamespace(
        prompt_tokens=1000,
        completion_tokens=50,
        cache_read_input_tokens=600,
        cache_creation_input_tokens=100,
    )
    local = usage_of("ollama_chat/qwen2.5:7b", SimpleNamespace(usage=usage), free=True)
    assert (local.input_tokens, local.output_tokens) == (300, 50)
    assert (local.cache_read_input_tokens, local.cache_creation_input_tokens) == (600, 100)
    assert local.cost_usd == 0.0
    unknown = usage_of("anthropic/no-such-model", SimpleNamespace(usage=usage))
    assert unknown.cost_usd == 0.0  # an unknown price costs 0 (and is logged once)
    assert usage_of("x", SimpleNamespace()).output_tokens == 0  # no usage at all
