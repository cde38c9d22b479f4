"""arq's own producer API gets answers from our worker: its data model is kept.

The worker does not use arq at all; it keeps arq's keys and JSON job and result
blobs, so ``arq.connections.create_pool(...).enqueue_job("route", request)`` with a
JSON serializer queues a job the worker runs, and arq's ``Job.result()`` and
``Job.info()`` read what it stored.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.jobs import Job, JobStatus, SerializationError

from llm_router.client.protocol import RouteResult
from llm_router_testing.stubs import StubServer
from tests.integration.conftest import REDIS_URL, WorkerProcess

pytestmark = pytest.mark.integration

SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["answer", "ok"],
    "properties": {"answer": {"type": "string"}, "ok": {"type": "boolean"}},
}


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


@pytest.fixture
async def arq_pool(worker: WorkerProcess, queue_name: str) -> AsyncIterator[ArqRedis]:
    pool = await create_pool(
        RedisSettings.from_dsn(REDIS_URL),
        job_serializer=dumps,
        job_deserializer=json.loads,
        default_queue_name=queue_name,
    )
    yield pool
    await pool.aclose()


async def test_arq_enqueue_job_and_job_result_get_the_answer(
    arq_pool: ArqRedis, stub: StubServer
) -> None:
    tag = uuid.uuid4().hex
    request = {
        "messages": [{"role": "user", "content": f"stub:qwen=json via arq {tag}"}],
        "schema": SCHEMA,
        "context": "tests.arq",
    }
    job = await arq_pool.enqueue_job("route", request, _job_id=f"arq-{tag}")
    assert job is not None
    answer = await job.result(timeout=30, poll_delay=0.05)
    result = RouteResult.model_validate(answer)
    assert result.status == "ok"
    assert result.content == {"answer": "qwen", "ok": True}
    assert (result.job_id, result.context) == (f"arq-{tag}", "tests.arq")
    assert await job.status() == JobStatus.complete
    info = await job.result_info()
    assert info is not None
    assert (info.success, info.function, info.job_try) == (True, "route", 1)
    assert info.queue_name == arq_pool.default_queue_name
    # The same id again is not queued twice: arq sees the result and does nothing.
    assert await arq_pool.enqueue_job("route", request, _job_id=f"arq-{tag}") is None


async def test_a_failing_chain_comes_back_to_arq_as_a_result(arq_pool: ArqRedis) -> None:
    """Every model rejected is still the job's return value (a ``failed`` result)."""
    request = {"messages": [{"role": "user", "content": "stub:*=refusal " + uuid.uuid4().hex}]}
    job = await arq_pool.enqueue_job("route", request)
    assert job is not None
    result = RouteResult.model_validate(await job.result(timeout=30, poll_delay=0.05))
    assert result.status == "failed"
    assert [a.outcome for a in result.attempts] == ["rejected"] * 3


async def test_arq_keyword_form_and_a_job_of_another_function(
    arq_pool: ArqRedis, queue_name: str
) -> None:
    tag = uuid.uuid4().hex
    job = await arq_pool.enqueue_job(
        "route", request={"messages": [{"role": "user", "content": f"keyword {tag}"}]}
    )
    assert job is not None
    assert RouteResult.model_validate(await job.result(timeout=30, poll_delay=0.05)).ok
    other = await arq_pool.enqueue_job("not_ours", 1, 2)
    assert other is not None
    # Not a function this worker has: a result all the same (arq raises it, as the job
    # did not succeed), not a job left hanging.
    with pytest.raises(SerializationError, match="unknown job function") as failed:
        await other.result(timeout=30, poll_delay=0.05)
    assert "not_ours" in str(failed.value)
    stored = Job(other.job_id, arq_pool, _queue_name=queue_name, _deserializer=json.loads)
    assert await stored.status() == JobStatus.complete
