"""Whatever lands in the queue, the worker answers it and keeps running.

Hypothesis writes arbitrary and malformed payloads straight into Redis, the
way a buggy or hostile producer could.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis import Redis as SyncRedis

from llm_router.client.keys import wake_key
from llm_router.client.protocol import result_from_blob
from tests.integration.conftest import WorkerProcess

pytestmark = pytest.mark.integration

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=15,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", "god", ""]) | json_values},
        optional={"content": st.text(max_size=40) | json_values, "name": json_values},
    ),
    max_size=3,
)
requests = st.fixed_dictionaries(
    {},
    optional={
        "messages": messages | json_values,
        "schema": st.sampled_from([{"type": "object"}, {"type": "objekt"}, {"minimum": "x"}])
        | json_values,
        "context": st.text(max_size=300) | json_values,
        "chain": st.sampled_from(["default", "local_only", "nope"]) | json_values,
        "metadata": json_values,
        "extra": json_values,
    },
)
jobs = st.fixed_dictionaries(
    {},
    optional={
        "t": st.sampled_from([None, 0, 1, 2, -1]) | json_values,
        "f": st.sampled_from(["route", "nope", "__import__"]) | json_values,
        "a": st.lists(requests, max_size=2) | json_values,
        "k": st.dictionaries(st.sampled_from(["request", "reply_to", "x"]), json_values)
        | json_values,
        "et": st.integers(min_value=-(2**63), max_value=2**64) | json_values,
    },
)
payloads = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    jobs.map(lambda v: json.dumps(v).encode()),
    requests.map(lambda r: json.dumps({"t": 1, "f": "route", "a": [r], "k": {}, "et": 1}).encode()),
)


@pytest.fixture(scope="module")
def sync_redis(redis_available: str) -> Iterator[SyncRedis]:
    client = SyncRedis.from_url(redis_available)
    yield client
    client.close()


def enqueue_raw(redis: SyncRedis, queue: str, payload: bytes) -> str:
    job_id = uuid.uuid4().hex
    now = int(time.time() * 1000)
    with redis.pipeline(transaction=True) as pipe:
        pipe.set(f"arq:job:{job_id}", payload, px=60_000)
        pipe.zadd(queue, {job_id: now})
        pipe.lpush(wake_key(queue), "1")
        pipe.execute()
    return job_id


def wait_result(redis: SyncRedis, job_id: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        blob = redis.get(f"arq:result:{job_id}")
        if blob is not None:
            return blob
        time.sleep(0.005)
    raise AssertionError(f"job {job_id} got no result within {timeout}s")


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(payload=payloads)
def test_any_payload_gets_a_result(
    payload: bytes, worker: WorkerProcess, queue_name: str, sync_redis: SyncRedis
) -> None:
    job_id = enqueue_raw(sync_redis, queue_name, payload)
    blob = wait_result(sync_redis, job_id)
    assert json.loads(blob)["id"] == job_id  # plain JSON, whatever came in
    result = result_from_blob(blob)
    assert result.status in {"ok", "failed", "invalid_request"}
    if result.status == "invalid_request":
        assert result.error
    if result.status == "failed":
        assert result.attempts or result.error
    assert worker.alive
    assert sync_redis.zscore(queue_name, job_id) is None  # nothing left behind in the queue


def test_worker_still_serves_after_the_onslaught(
    worker: WorkerProcess, queue_name: str, sync_redis: SyncRedis
) -> None:
    request = {"messages": [{"role": "user", "content": "still there?"}]}
    payload = json.dumps({"t": 1, "f": "route", "a": [request], "k": {}, "et": 1}).encode()
    result = result_from_blob(wait_result(sync_redis, enqueue_raw(sync_redis, queue_name, payload)))
    assert result.ok
    assert worker.alive
    # No payload got past the job's own error handling into the worker's.
    assert worker.events("job_crashed") == []
