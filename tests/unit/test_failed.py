"""The failed-job registry's reader: list, show, requeue's refusals, purge (fakeredis)."""

from __future__ import annotations

import json

from redis.asyncio import Redis

from llm_router.client.failed import FailedJobs
from llm_router.client.keys import FAILED_KEY, failed_key
from llm_router.client.protocol import RouteResult, encode

JOB = {"t": 1, "f": "route", "a": [{"messages": [{"role": "user", "content": "hi"}]}], "k": {}}


async def put(redis: Redis, job_id: str, at_ms: int, job: object = JOB, queue: str = "q") -> None:
    result = RouteResult(status="failed", error="all 3 models failed", job_id=job_id)
    entry = {
        "job_id": job_id,
        "queue": queue,
        "job": json.dumps(job) if job is not None else None,
        "result": {"r": result.model_dump(mode="json"), "id": job_id},
    }
    await redis.set(failed_key(job_id), encode(entry))
    await redis.zadd(FAILED_KEY, {job_id: at_ms})


async def test_list_is_newest_first_and_skips_lapsed_entries(redis: Redis) -> None:
    await put(redis, "old", 1_000)
    await put(redis, "new", 3_000)
    await redis.zadd(FAILED_KEY, {"lapsed": 2_000})  # its entry's TTL ran out
    registry = FailedJobs(redis)
    entries = await registry.list()
    assert [e.job_id for e in entries] == ["new", "old"]
    assert entries[0].failed_at == 3.0
    assert entries[0].result.error == "all 3 models failed"
    assert entries[0].request == JOB["a"][0]  # type: ignore[index]
    assert await registry.count() == 3
    assert [e.job_id for e in await registry.list(limit=1)] == ["new"]


async def test_show_reads_the_keyword_form_and_says_when_there_is_no_blob(redis: Redis) -> None:
    keyword = {**JOB, "a": [], "k": {"request": {"messages": []}}}
    await put(redis, "kw", 1, job=keyword)
    await put(redis, "gone", 2, job=None)
    registry = FailedJobs(redis)
    kw = await registry.show("kw")
    assert kw is not None
    assert kw.request == {"messages": []}
    gone = await registry.show("gone")
    assert gone is not None
    assert gone.job is None
    assert await registry.requeue("gone") == (
        "it expired before it ran: there is no job blob to run again"
    )
    assert await registry.show("nope") is None
    assert await registry.requeue("nope") == "not in the registry"


async def test_requeue_puts_the_blob_back_as_it_was(redis: Redis) -> None:
    await put(redis, "r1", 1)
    await redis.set("arq:result:r1", "{}")
    await redis.set("arq:retry:r1", 4)
    registry = FailedJobs(redis)
    assert await registry.requeue("r1") is None
    assert json.loads(await redis.get("arq:job:r1")) == JOB
    assert await redis.exists("arq:result:r1", "arq:retry:r1", failed_key("r1")) == 0
    assert await redis.zscore("q", "r1") is not None
    assert await redis.llen("q:wake") == 1  # type: ignore[misc]
    assert await redis.zscore(FAILED_KEY, "r1") is None
    await put(redis, "r1", 2)  # failed again while queued: not queued twice
    assert await registry.requeue("r1") == "it is queued or running already"


async def test_purge_forgets_everything(redis: Redis) -> None:
    for n in range(3):
        await put(redis, f"p{n}", n)
    assert await FailedJobs(redis).purge() == 3
    assert await redis.exists(FAILED_KEY, *(failed_key(f"p{n}") for n in range(3))) == 0
