"""The hostile catalogue against the checks alone: no sockets, no worker.

The same entries go through a real worker in tests/integration/test_hostile_requests.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator

import pytest

from llm_router.client.client import build_request
from llm_router.client.schemas import compile_schema
from llm_router.worker.checks import AnswerChecks, AnswerLimits, RefusalDetector, judge
from llm_router.worker.jobs import Finished, RouteJobs, decode_job
from llm_router.worker.offload import Offload
from llm_router.worker.router import Router
from llm_router.worker.settings import DEFAULT_REFUSAL_PATTERNS, Settings
from llm_router_testing.hostile import ANSWER_SIDE, REQUEST_SIDE, Hostile
from llm_router_testing.inproc import claimed
from llm_router_testing.stubs import Behaviour, answer_text


def _name(entry: Hostile) -> str:
    return entry.name


def _answer(entry: Hostile) -> str:
    if entry.behaviour == "echo":
        assert entry.answer is not None
        return entry.answer
    return answer_text(Behaviour(entry.behaviour), "*", "")


@pytest.mark.parametrize("entry", [h for h in REQUEST_SIDE if h.client_refuses], ids=_name)
def test_the_client_refuses_request_side_entries(entry: Hostile) -> None:
    payload = entry.payload("unit")
    with pytest.raises(ValueError) as info:  # noqa: PT011 - the message is checked below
        build_request(
            payload["messages"], schema=payload.get("schema"), metadata=payload.get("metadata")
        )
    assert entry.refused is not None
    assert entry.refused in str(info.value)


@pytest.mark.parametrize("entry", REQUEST_SIDE, ids=_name)
async def test_the_worker_answers_request_side_entries_invalid_request(entry: Hostile) -> None:
    blob = b'{"t":1,"f":"route","a":[%s],"k":{},"et":1}' % entry.wire_text("unit").encode()
    assert entry.refused is not None
    settings = Settings()
    if entry.at_read:  # refused as it is read: still an invalid_request result
        with pytest.raises(ValueError, match=re.escape(entry.refused)):
            decode_job(blob, max_bytes=settings.max_request_bytes)
    router = Router(settings)
    try:
        finished = await RouteJobs(router, settings).run(claimed("hostile", blob))
        assert isinstance(finished, Finished), finished
    finally:
        await router.aclose()
    out = finished.result.model_dump(mode="json")
    assert out["status"] == "invalid_request"
    assert out["attempts"] == []  # no model was called
    assert entry.refused in out["error"]
    json.dumps(out)  # and the result can be written


@pytest.fixture
async def checks() -> AsyncIterator[AnswerChecks]:
    offload = Offload()
    yield AnswerChecks(RefusalDetector(DEFAULT_REFUSAL_PATTERNS), Settings().answer_limits, offload)
    offload.close()


@pytest.mark.parametrize("entry", ANSWER_SIDE, ids=_name)
async def test_answer_side_entries_are_invalid_with_a_reason(
    entry: Hostile, checks: AnswerChecks
) -> None:
    compiled = compile_schema(entry.schema, Settings().schema_limits).validator
    verdict = await checks.judge(_answer(entry), compiled)
    assert verdict.outcome == "invalid"
    assert verdict.reason is not None
    assert entry.invalid is not None
    assert verdict.reason.startswith(entry.invalid), verdict.reason


@pytest.mark.parametrize("seconds", [0.05, 0.2])
def test_the_costliest_entries_stop_at_the_budget(seconds: float) -> None:
    refusals = RefusalDetector(DEFAULT_REFUSAL_PATTERNS)
    costly = [h for h in ANSWER_SIDE if h.invalid == "ValidationTooCostly"]
    assert costly
    for entry in costly:
        compiled = compile_schema(entry.schema).validator
        limits = AnswerLimits(max_seconds=seconds)
        verdict = judge(_answer(entry), refusals, compiled, limits)
        assert verdict.reason is not None
        assert f"after {seconds:g} s of CPU (max_check_seconds)" in verdict.reason
