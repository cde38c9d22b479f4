"""The worker's Redis scripts and failure paths, against fakeredis (Lua included)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import pytest
from arq.worker import func

from llm_router.client.protocol import wake_key
from llm_router.worker.daemon import RouterWorker, reply_to_of
from llm_router.worker.jobs import deserialize, serialize
from llm_router.worker.outage import RedisOutage
from llm_router.worker.scripts import CLAIM, FINISH, RENEW

Q = "q-daemon"
IP = "arq:in-progress:"


@pytest.fixture
async def redis() -> AsyncIterator[fakeredis.FakeAsyncRedis]:
    client = fakeredis.FakeAsyncRedis()
    yield client
    await client.aclose()


async def _noop(ctx: dict[str, Any]) -> None:
    return None


@pytest.fixture
def worker(redis: fakeredis.FakeAsyncRedis) -> RouterWorker:
    w = RouterWorker(
        functions=[func(_noop, name="route")],
        redis_pool=redis,
        queue_name=Q,
        handle_signals=False,
        job_serializer=serialize,
        job_deserializer=deserialize,
        max_tries=3,
    )
    w._finish = redis.register_script(FINISH)
    return w


async def claim_raw(
    redis: fakeredis.FakeAsyncRedis,
    token: str,
    want: int,
    scan: int = 2000,
    queues: dict[str, int] | None = None,
) -> list[Any]:
    """The claim script: ``queues`` maps each queue, in claim order, to its share."""
    queues = queues or {Q: want}
    args = [10**13, 10_000, want, token, scan, 3600, *queues.values()]
    out: list[Any] = await redis.eval(CLAIM, len(queues), *queues, *args)  # type: ignore[misc, arg-type]
    return out


async def claim(
    redis: fakeredis.FakeAsyncRedis,
    token: str,
    want: int,
    scan: int = 2000,
    queues: dict[str, int] | None = None,
) -> list[str]:
    out = await claim_raw(redis, token, want, scan, queues)
    return [out[i + 1].decode() for i in range(0, len(out), 5)]


async def test_claim_skips_jobs_others_are_running(redis: fakeredis.FakeAsyncRedis) -> None:
    await redis.zadd(Q, {f"j{n}": n for n in range(5)})
    for n in range(3):
        await redis.set(f"{IP}j{n}", "other")
    assert await claim(redis, "me", 2) == ["j3", "j4"]
    assert await redis.get(f"{IP}j3") == b"me"
    assert await claim(redis, "you", 2) == []  # nothing left to take


async def test_claim_reads_the_job_and_counts_the_try(redis: fakeredis.FakeAsyncRedis) -> None:
    await redis.zadd(Q, {"j1": 5, "gone": 6})
    await redis.set("arq:job:j1", "blob")
    await redis.set("arq:retry:j1", 1)  # started once before
    out = await claim_raw(redis, "me", 5)
    assert out == [0, b"j1", b"5", b"blob", 2, 0, b"gone", b"6", None, 1]
    assert 0 < await redis.ttl("arq:retry:j1") <= 3600


async def test_claim_pages_past_a_long_head_of_running_jobs(
    redis: fakeredis.FakeAsyncRedis,
) -> None:
    await redis.zadd(Q, {f"j{n:04}": n for n in range(350)})
    for n in range(300):
        await redis.set(f"{IP}j{n:04}", "other")
    assert await claim(redis, "me", 3) == ["j0300", "j0301", "j0302"]
    assert await claim(redis, "me", 3, scan=100) == []  # bounded by the scan limit


async def test_claim_serves_the_interactive_queue_first_within_each_share(
    redis: fakeredis.FakeAsyncRedis,
) -> None:
    batch = Q + ":batch"
    await redis.zadd(batch, {f"b{n}": n for n in range(10)})  # older than the interactive ones
    await redis.zadd(Q, {f"i{n}": 100 + n for n in range(2)})
    # 5 slots free, batch may fill 2 of them: both interactive jobs, then 2 batch jobs.
    out = await claim_raw(redis, "me", 5, queues={Q: 5, batch: 2})
    assert [(out[i], out[i + 1].decode()) for i in range(0, len(out), 5)] == [
        (0, "i0"),
        (0, "i1"),
        (1, "b0"),
        (1, "b1"),
    ]
    # The total caps the shares: 1 slot free, batch's share unused.
    assert await claim(redis, "me", 1, queues={Q: 1, batch: 1}) == ["b2"]
    assert await claim(redis, "me", 3, queues={Q: 3, batch: 0}) == []


async def test_renew_extends_only_own_leases(redis: fakeredis.FakeAsyncRedis) -> None:
    await redis.set(f"{IP}a", "me", px=1000)
    await redis.set(f"{IP}b", "other", px=1000)
    lost = await redis.eval(RENEW, 3, f"{IP}a", f"{IP}b", f"{IP}c", "me", 60_000)  # type: ignore[misc, arg-type]
    assert sorted(lost) == [f"{IP}b".encode(), f"{IP}c".encode()]
    assert await redis.pttl(f"{IP}a") > 50_000
    assert await redis.pttl(f"{IP}b") <= 1000


def finish_keys(job_id: str, reply_to: str = "") -> list[str]:
    return [f"arq:result:{job_id}", f"{IP}{job_id}", f"arq:retry:{job_id}",
            f"arq:job:{job_id}", Q, reply_to, wake_key(Q)]  # fmt: skip


async def finish(redis: fakeredis.FakeAsyncRedis, job_id: str, token: str, blob: str,
                 reply_to: str = "") -> int:  # fmt: skip
    args = [job_id, token, blob, 60_000, 600, 100]
    return int(await redis.eval(FINISH, 7, *finish_keys(job_id, reply_to), *args))  # type: ignore[misc, arg-type]


async def test_first_result_wins_and_is_pushed_once(redis: fakeredis.FakeAsyncRedis) -> None:
    await redis.zadd(Q, {"j": 1})
    await redis.set("arq:job:j", "{}")
    await redis.set(f"{IP}j", "first")
    assert await finish(redis, "j", "first", "one", "llm_router:reply:x") == 1
    await redis.set(f"{IP}j", "second")  # a second run, after the lease lapsed
    assert await finish(redis, "j", "second", "two", "llm_router:reply:x") == 0
    assert await redis.get("arq:result:j") == b"one"
    assert await redis.lrange("llm_router:reply:x", 0, -1) == [b"one"]  # type: ignore[misc]
    assert await redis.exists("arq:job:j", f"{IP}j") == 0
    assert await redis.zcard(Q) == 0


async def test_hand_back_only_with_own_lease(redis: fakeredis.FakeAsyncRedis) -> None:
    await redis.zadd(Q, {"j": 1})
    await redis.set("arq:retry:j", 1)
    await redis.set(f"{IP}j", "someone-else")
    assert await finish(redis, "j", "me", "") == 0
    assert await redis.get("arq:retry:j") == b"1"
    assert await redis.llen(wake_key(Q)) == 0  # type: ignore[misc]
    await redis.set(f"{IP}j", "me")
    assert await finish(redis, "j", "me", "") == 1
    assert await redis.get("arq:retry:j") == b"0"  # a hand-back is not a try
    assert await redis.exists(f"{IP}j") == 0
    assert await redis.llen(wake_key(Q)) == 1  # type: ignore[misc]  # another worker wakes at once
    assert await redis.zscore(Q, "j") == 1  # still queued


async def test_hand_back_never_drives_the_try_count_below_zero(
    redis: fakeredis.FakeAsyncRedis,
) -> None:
    await redis.set(f"{IP}j", "me")
    assert await finish(redis, "j", "me", "") == 1
    assert await redis.get("arq:retry:j") is None


async def test_failed_job_reply_goes_to_the_list_its_blob_names(
    worker: RouterWorker, redis: fakeredis.FakeAsyncRedis
) -> None:
    blob = {"t": 1, "f": "nope", "a": [], "k": {"reply_to": "llm_router:reply:p"}, "et": 1}
    raw = json.dumps(blob).encode()
    await redis.set("arq:job:p1", raw)
    await redis.set(f"{IP}p1", worker.token)
    await worker._run("p1", 1, raw, 1)  # unknown function: it cannot run
    pushed = await redis.lrange("llm_router:reply:p", 0, -1)  # type: ignore[misc]
    assert len(pushed) == 1
    result = json.loads(pushed[0])["r"]
    assert result["status"] == "invalid_request"
    assert "nope" in result["error"]
    assert await redis.exists("arq:job:p1", f"{IP}p1") == 0


async def test_a_job_over_max_tries_fails_without_running(
    worker: RouterWorker, redis: fakeredis.FakeAsyncRedis
) -> None:
    raw = json.dumps({"t": 1, "f": "route", "a": [], "k": {}, "et": 1}).encode()
    await worker._run("p2", 1, raw, worker.max_tries + 1)
    stored = await redis.get("arq:result:p2")
    assert stored is not None
    result = json.loads(stored)["r"]
    assert result["status"] == "failed"
    assert "not tried again" in result["error"]


async def test_an_expired_job_gets_a_failed_result(
    worker: RouterWorker, redis: fakeredis.FakeAsyncRedis
) -> None:
    await worker._run("p3", 1, None, 1)
    stored = await redis.get("arq:result:p3")
    assert stored is not None
    assert "expired" in json.loads(stored)["r"]["error"]


@pytest.mark.parametrize(
    ("blob", "expected"),
    [
        (b'{"k": {"reply_to": "llm_router:reply:a"}}', "llm_router:reply:a"),
        (b'{"k": {"reply_to": "arq:queue"}}', None),  # not ours to push to
        (b'{"k": []}', None),
        (b"not json", None),
        (None, None),
    ],
)
def test_reply_to_of(blob: bytes | None, expected: str | None) -> None:
    assert reply_to_of(blob) == expected


def test_outage_logs_once_and_backs_off(capsys: pytest.CaptureFixture[str]) -> None:
    outage = RedisOutage()
    delays = [outage.failed(ConnectionError("down"), "polling") for _ in range(12)]
    assert delays == sorted(delays)
    assert delays[0] < 0.5
    assert delays[-1] == 5.0
    outage.ok()
    assert outage.failures == 0


async def test_a_handed_job_starts_at_once(
    worker: RouterWorker, redis: fakeredis.FakeAsyncRedis
) -> None:
    raw = json.dumps({"t": 1, "f": "route", "a": [], "k": {}, "et": 1}).encode()
    worker._take_handed_job(b"h1 1 5 " + raw)
    assert "h1" in worker.tasks
    assert "h1" in worker._leased
    await worker.tasks["h1"]
    assert await redis.get("arq:result:h1") is not None


@pytest.mark.parametrize("why", ["stopping", "full"])
async def test_a_handed_job_goes_back_when_stopping_or_full(
    worker: RouterWorker, redis: fakeredis.FakeAsyncRedis, why: str
) -> None:
    """Full: the producer saw a free slot, the poll filled it meanwhile; never run
    max_jobs + 1."""
    await redis.zadd(Q, {"h2": 5})
    await redis.set(f"{IP}h2", worker.token)
    await redis.set("arq:retry:h2", 1)
    if why == "stopping":
        worker.allow_pick_jobs = False
    else:
        worker.job_counter = worker.max_jobs
    worker._take_handed_job(b"h2 1 5 {}")
    await asyncio.gather(*worker._background)
    assert "h2" not in worker.tasks
    assert await redis.exists(f"{IP}h2") == 0
    assert await redis.get("arq:retry:h2") == b"0"
    assert await redis.llen(wake_key(Q)) == 1  # type: ignore[misc]
    assert await redis.zscore(Q, "h2") == 5


def test_a_freed_slot_claims_again_while_a_queue_has_a_backlog(worker: RouterWorker) -> None:
    """Producers push at most 100 wake-up tokens: a longer queue must not wait for polls."""
    queue = worker.lanes.interactive
    assert worker.max_jobs == 10
    worker.job_counter = queue.running = 6  # not full: the old rule would not look again
    worker.lanes.claimed([6], [6])  # the last claim got all it asked for
    worker._wake.clear()
    worker._job_done(queue)
    assert worker._wake.is_set()
    # Drained (the last claim got less than it asked for): wake-up tokens will tell.
    worker.lanes.claimed([4], [1])
    worker._wake.clear()
    worker._job_done(queue)
    assert not worker._wake.is_set()
    # Full, a slot frees: look at once whatever the backlog (no tokens were taken).
    worker.job_counter = queue.running = 10
    worker._job_done(queue)
    assert worker._wake.is_set()


def test_batch_work_keeps_to_its_share_of_the_slots(redis: fakeredis.FakeAsyncRedis) -> None:
    w = RouterWorker(
        functions=[func(_noop, name="route")],
        redis_pool=redis,
        queue_name=Q,
        batch_queue=Q + ":batch",
        batch_max_jobs=3,
        batch_keep_result=600,
        handle_signals=False,
        max_jobs=5,
    )
    assert w.lanes.names == [Q, Q + ":batch"]
    batch = w.lanes.queues[1]
    assert (batch.max_jobs, batch.keep_result_s) == (3, 600)
    batch.running = w.job_counter = 3
    assert w.lanes.wants(5 - w.job_counter) == [2, 0]
    assert w.lanes.wake_keys(2) == [Q + ":wake"]
