"""The queue's scripts and the worker's loop, against fakeredis (Lua included).

The scripts through :class:`~llm_router.worker.queue.RedisQueue`; the loop through its
public surface (``serve``, ``stop``, ``running``), with a job runner that records what
it was given; the route job's own verdicts through
:class:`~llm_router.worker.jobs.RouteJobs`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import fakeredis
import pytest
from redis.exceptions import OutOfMemoryError
from structlog.testing import capture_logs

from llm_router.client import RouterClient
from llm_router.client.keys import FAILED_KEY, METRICS_PENDING_KEY, wake_key
from llm_router.client.protocol import RouteResult, result_from_blob
from llm_router.worker.control import Control
from llm_router.worker.jobs import Finished, RouteJobs, reply_to_of
from llm_router.worker.lanes import Lanes
from llm_router.worker.loop import Worker
from llm_router.worker.outage import RedisOutage
from llm_router.worker.queue import Claimed, RedisQueue
from llm_router.worker.router import Router
from llm_router.worker.settings import Settings

Q = "q-loop"
IP = "arq:in-progress:"


@pytest.fixture
async def redis() -> AsyncIterator[fakeredis.FakeAsyncRedis]:
    client = fakeredis.FakeAsyncRedis()
    yield client
    await client.aclose()


def lanes(max_jobs: int = 10, batch_max_jobs: int = 8) -> Lanes:
    return Lanes(
        Q,
        Q + ":batch",
        max_jobs=max_jobs,
        batch_max_jobs=batch_max_jobs,
        keep_result_s=60,
        batch_keep_result_s=600,
    )


def queue_for(redis: fakeredis.FakeAsyncRedis, token: str = "me", **kw: Any) -> RedisQueue:
    return RedisQueue(redis, lanes(**kw), token=token, lease_ms=10_000)


async def put(redis: fakeredis.FakeAsyncRedis, job_id: str, score: int, blob: Any = None) -> None:
    """What an arq producer writes: the job blob and the queue entry (no wake-up)."""
    body = blob or {"t": 1, "f": "route", "a": [], "k": {}, "et": score}
    await redis.set(f"arq:job:{job_id}", json.dumps(body))
    await redis.zadd(Q, {job_id: score})


# --- the queue's scripts ---------------------------------------------------------------------


async def test_claim_skips_jobs_others_are_running(redis: fakeredis.FakeAsyncRedis) -> None:
    for n in range(5):
        await put(redis, f"j{n}", n)
    for n in range(3):
        await redis.set(f"{IP}j{n}", "other")
    mine = await queue_for(redis).claim([2, 0], 2)
    assert [j.job_id for j in mine] == ["j3", "j4"]
    assert await redis.get(f"{IP}j3") == b"me"
    assert await queue_for(redis, "you").claim([2, 0], 2) == []  # nothing left to take


async def test_claim_reads_the_job_and_counts_the_try(redis: fakeredis.FakeAsyncRedis) -> None:
    await redis.zadd(Q, {"j1": 5, "gone": 6})
    await redis.set("arq:job:j1", "blob")
    await redis.set("arq:retry:j1", 1)  # started once before
    queue = queue_for(redis)
    claimed = await queue.claim([5, 0], 5)
    assert claimed == [
        Claimed("j1", queue.lanes.interactive, 5, b"blob", 2),
        Claimed("gone", queue.lanes.interactive, 6, None, 1),
    ]
    assert 0 < await redis.ttl("arq:retry:j1") <= 88_400


async def test_claim_pages_past_a_long_head_of_running_jobs(
    redis: fakeredis.FakeAsyncRedis,
) -> None:
    await redis.zadd(Q, {f"j{n:04}": n for n in range(2350)})
    for n in range(300):
        await redis.set(f"{IP}j{n:04}", "other")
    claimed = await queue_for(redis).claim([3, 0], 3)
    assert [j.job_id for j in claimed] == ["j0300", "j0301", "j0302"]
    for n in range(303, 2350):
        await redis.set(f"{IP}j{n:04}", "other")
    assert await queue_for(redis).claim([3, 0], 3) == []  # bounded by the scan limit


async def test_claim_serves_the_interactive_queue_first_within_each_share(
    redis: fakeredis.FakeAsyncRedis,
) -> None:
    batch = Q + ":batch"
    await redis.zadd(batch, {f"b{n}": n for n in range(10)})  # older than the interactive ones
    await redis.zadd(Q, {f"i{n}": 100 + n for n in range(2)})
    queue = queue_for(redis)
    # 5 slots free, batch may fill 2 of them: both interactive jobs, then 2 batch jobs.
    claimed = await queue.claim([5, 2], 5)
    assert [(j.lane.kind, j.job_id) for j in claimed] == [
        ("interactive", "i0"),
        ("interactive", "i1"),
        ("batch", "b0"),
        ("batch", "b1"),
    ]
    # The total caps the shares: 1 slot free, batch's share unused.
    assert [j.job_id for j in await queue.claim([1, 1], 1)] == ["b2"]
    assert await queue.claim([3, 0], 3) == []


async def test_renew_extends_only_own_leases(redis: fakeredis.FakeAsyncRedis) -> None:
    await redis.set(f"{IP}a", "me", px=1000)
    await redis.set(f"{IP}b", "other", px=1000)
    await redis.set("llm_router:cancel:a", "1")  # its producer cancelled it
    lost, cancelled = await queue_for(redis).renew(["a", "b", "c"])
    assert sorted(lost) == ["b", "c"]
    assert cancelled == ["a"]
    assert await redis.pttl(f"{IP}a") > 5_000
    assert await redis.pttl(f"{IP}b") <= 1000
    assert await queue_for(redis).renew([]) == ([], [])


async def test_first_result_wins_is_pushed_once_and_marked_for_the_metrics(
    redis: fakeredis.FakeAsyncRedis,
) -> None:
    await put(redis, "j", 1)
    first, second = queue_for(redis, "first"), queue_for(redis, "second")
    job = Claimed("j", first.lanes.interactive, 1, b"{}", 1)
    await redis.set(f"{IP}j", "first")
    assert await first.finish(job, b"one", "llm_router:reply:x", announce=True)
    await redis.set(f"{IP}j", "second")  # a second run, after the lease lapsed
    assert not await second.finish(job, b"two", "llm_router:reply:x", announce=True)
    assert await redis.get("arq:result:j") == b"one"
    assert 0 < await redis.pttl("arq:result:j") <= 60_000
    assert await redis.lrange("llm_router:reply:x", 0, -1) == [b"one"]  # type: ignore[misc]
    assert await redis.exists("arq:job:j", f"{IP}j") == 0
    assert await redis.zcard(Q) == 0
    assert await redis.zrange(METRICS_PENDING_KEY, 0, -1) == [b"j"]


async def test_a_result_not_to_announce_is_not_marked(redis: fakeredis.FakeAsyncRedis) -> None:
    queue = queue_for(redis)
    await redis.set(f"{IP}k", "me")
    job = Claimed("k", queue.lanes.interactive, 1, b"{}", 1)
    assert await queue.finish(job, b"r", None, announce=False)
    assert await redis.zcard(METRICS_PENDING_KEY) == 0
    assert await redis.zcard(FAILED_KEY) == 0  # not registered unless asked


async def test_the_failed_job_registry_keeps_the_newest_within_its_bounds(
    redis: fakeredis.FakeAsyncRedis,
) -> None:
    queue = RedisQueue(redis, lanes(), token="me", lease_ms=10_000, failed_keep=3)
    for n in range(5):
        await redis.set(f"{IP}f{n}", "me")
        job = Claimed(f"f{n}", queue.lanes.interactive, n, b'{"a": [%d]}' % n, 1)
        assert await queue.finish(
            job, b'{"r": {"status": "failed"}}', None, announce=True, register=True
        )
    assert await redis.zrange(FAILED_KEY, 0, -1) == [b"f2", b"f3", b"f4"]
    assert await redis.exists("llm_router:failed:f0", "llm_router:failed:f1") == 0
    entry = json.loads(await redis.get("llm_router:failed:f4"))
    assert entry == {
        "job_id": "f4",
        "queue": Q,
        "job": '{"a": [4]}',  # the blob as it came, to requeue it unchanged
        "result": {"r": {"status": "failed"}},
    }
    assert 0 < await redis.pttl("llm_router:failed:f4") <= 7 * 86_400_000
    none = RedisQueue(redis, lanes(), token="me", lease_ms=10_000, failed_keep=0)
    await redis.set(f"{IP}g", "me")
    job = Claimed("g", none.lanes.interactive, 1, b"{}", 1)
    assert await none.finish(job, b"{}", None, announce=True, register=True)
    assert await redis.exists("llm_router:failed:g") == 0  # 0 keeps none


async def test_hand_back_only_with_own_lease(redis: fakeredis.FakeAsyncRedis) -> None:
    queue = queue_for(redis)
    lane = queue.lanes.interactive
    await redis.zadd(Q, {"j": 1})
    await redis.set("arq:retry:j", 1)
    await redis.set(f"{IP}j", "someone-else")
    assert not await queue.hand_back("j", lane)
    assert await redis.get("arq:retry:j") == b"1"
    assert await redis.llen(wake_key(Q)) == 0  # type: ignore[misc]
    await redis.set(f"{IP}j", "me")
    assert await queue.hand_back("j", lane)
    assert await redis.get("arq:retry:j") == b"0"  # a hand-back is not a try
    assert await redis.exists(f"{IP}j") == 0
    assert await redis.llen(wake_key(Q)) == 1  # type: ignore[misc]  # another worker wakes at once
    assert await redis.zscore(Q, "j") == 1  # still queued


async def test_hand_back_never_drives_the_try_count_below_zero(
    redis: fakeredis.FakeAsyncRedis,
) -> None:
    queue = queue_for(redis)
    await redis.set(f"{IP}j", "me")
    assert await queue.hand_back("j", queue.lanes.interactive)
    assert await redis.get("arq:retry:j") is None


async def test_a_waiting_worker_is_handed_the_next_job_at_enqueue(
    redis: fakeredis.FakeAsyncRedis,
) -> None:
    queue = queue_for(redis)
    client = RouterClient(redis=redis, queue_name=Q)
    waiting = asyncio.ensure_future(queue.wait_for_work(queue.lanes.queues, 2.0))
    while not await redis.zcard(queue.idle_key):
        await asyncio.sleep(0.01)
    handle = await client.enqueue("hello", job_id="h1")
    handed = await waiting
    await client.aclose()
    assert isinstance(handed, Claimed)
    assert (handed.job_id, handed.tries, handed.lane.kind) == (handle.job_id, 1, "interactive")
    assert handed.blob is not None
    assert json.loads(handed.blob)["a"][0]["messages"][0]["content"] == "hello"
    assert await redis.get(f"{IP}h1") == b"me"  # leased to it in the enqueue
    assert await queue.withdraw() == []
    assert await redis.zcard(queue.idle_key) == 0


async def test_a_job_handed_over_is_taken_even_when_the_registration_is_refused(
    redis: fakeredis.FakeAsyncRedis,
) -> None:
    """A full Redis refuses the idle registration's write, but the BLPOP beside it in the
    pipeline still pops: that job must be run, not dropped with the error."""
    queue = queue_for(redis)
    oom = "return redis.error_reply('OOM command not allowed when used memory > maxmemory')"
    queue._register = redis.register_script(oom)
    await redis.lpush(queue.inbox_key, b"h1 1 1000 {}")  # type: ignore[misc]
    handed = await queue.wait_for_work(queue.lanes.queues, 0.1)
    assert isinstance(handed, Claimed)
    assert handed.job_id == "h1"
    with pytest.raises(OutOfMemoryError):  # nothing popped: the refusal shows
        await queue.wait_for_work(queue.lanes.queues, 0.1)


def test_outage_logs_once_and_backs_off() -> None:
    outage = RedisOutage()
    delays = [outage.failed(ConnectionError("down"), "polling") for _ in range(12)]
    assert delays == sorted(delays)
    assert delays[0] < 0.5
    assert delays[-1] == 5.0
    outage.ok()
    assert outage.failures == 0


def test_a_full_redis_is_one_streak_that_only_a_write_ends() -> None:
    outage = RedisOutage()
    full = OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")
    with capture_logs() as logs:
        outage.failed(full, "storing a result")
        outage.ok()  # a lease renewal: reads and PEXPIRE still work on a full Redis
        outage.failed(full, "storing a result")
        assert outage.full
        outage.wrote()
    assert [e["event"] for e in logs] == ["redis_full", "redis_room_again"]
    assert logs[-1]["refused_writes"] == 2
    assert not outage.full


# --- the loop --------------------------------------------------------------------------------


class Recorder:
    """A job runner that answers ``ok`` for each job; ``gate`` holds them until set."""

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.ran: list[str] = []
        self.released: list[str] = []
        self.gate = gate

    async def run(self, job: Claimed, control: Control) -> Finished:
        self.ran.append(job.job_id)
        if self.gate is not None:
            await self.gate.wait()
        result = RouteResult(status="ok", job_id=job.job_id)
        return Finished(result, True, reply_to_of(job.blob), function="route", enqueued_ms=1)

    def crashed(self, job: Claimed, exc: BaseException) -> Finished:
        return Finished(RouteResult(status="failed", error=repr(exc), job_id=job.job_id), False)

    def cancelled(self, job: Claimed) -> Finished:
        return Finished(RouteResult(status="cancelled", job_id=job.job_id), True)

    async def release_parked(self, job_id: str) -> None:
        self.released.append(job_id)


class Served:
    """A worker serving in the background, as ``serve`` runs it in the daemon."""

    def __init__(self, queue: RedisQueue, runner: Recorder, **kw: Any) -> None:
        self.worker = Worker(queue, runner, poll_delay=kw.pop("poll_delay", 0.05), **kw)
        self.task = asyncio.ensure_future(self.worker.serve(handle_signals=False))

    async def running(self, n: int) -> None:
        await until(lambda: self.worker.running == n)

    async def stop(self) -> None:
        self.worker.stop()
        await self.task


async def until(check: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        done = check()
        if done if isinstance(done, bool) else await done:
            return
        assert time.monotonic() < deadline, "never got there"
        await asyncio.sleep(0.01)


async def handed_back(redis: fakeredis.FakeAsyncRedis, job_id: str) -> bool:
    """Released unfinished: the start is not counted, and no lease is left to lapse."""
    return bool(await redis.get(f"arq:retry:{job_id}") == b"0") and not await redis.exists(
        f"{IP}{job_id}"
    )


async def test_a_backlog_drains_without_waiting_for_polls_or_wake_ups(
    redis: fakeredis.FakeAsyncRedis,
) -> None:
    """Producers push at most 100 wake-up tokens, and arq's none: a freed slot claims
    again at once while the last claim got all it asked for."""
    for n in range(60):
        await put(redis, f"b{n:02}", n)
    runner = Recorder()
    started = time.monotonic()
    served = Served(queue_for(redis, max_jobs=5), runner, poll_delay=60.0)  # no safety poll

    async def drained() -> bool:
        return int(await redis.zcard(Q)) == 0

    await until(drained)
    elapsed = time.monotonic() - started
    await served.stop()
    assert sorted(runner.ran) == [f"b{n:02}" for n in range(60)]
    assert elapsed < 5
    blobs = await redis.mget([f"arq:result:b{n:02}" for n in range(60)])
    assert {result_from_blob(b).status for b in blobs} == {"ok"}


async def test_never_more_jobs_than_slots_and_a_job_handed_meanwhile_waits_for_one(
    redis: fakeredis.FakeAsyncRedis,
) -> None:
    gate = asyncio.Event()
    queue, runner = queue_for(redis, max_jobs=2), Recorder(gate)
    served = Served(queue, runner)
    for n in range(3):
        await put(redis, f"f{n}", n)
        await redis.lpush(wake_key(Q), "1")  # type: ignore[misc]
    await served.running(2)
    # A producer that saw this worker idle a moment ago hands it a job (its enqueue
    # script read the idle set before the worker withdrew from it).
    await redis.zadd(queue.idle_key, {f"{queue.token}|10000": 2**50})
    async with RouterClient(redis=redis, queue_name=Q) as client:
        await client.enqueue("handed over", job_id="late")
    await asyncio.sleep(0.3)
    assert served.worker.running == 2  # full: neither the third job nor the handed one runs
    assert sorted(runner.ran) == ["f0", "f1"]
    gate.set()
    await until(lambda: sorted(runner.ran) == ["f0", "f1", "f2", "late"])
    await served.stop()
    assert result_from_blob(await redis.get("arq:result:late")).ok


async def test_a_job_handed_over_while_stopping_goes_back_at_once(
    redis: fakeredis.FakeAsyncRedis,
) -> None:
    gate = asyncio.Event()
    queue, runner = queue_for(redis, max_jobs=1), Recorder(gate)
    served = Served(queue, runner, shutdown_grace=5.0)
    await put(redis, "s1", 1)
    await served.running(1)
    await redis.zadd(queue.idle_key, {f"{queue.token}|10000": 2**50})
    async with RouterClient(redis=redis, queue_name=Q) as client:
        await client.enqueue("handed over", job_id="late")
    served.worker.stop()
    await until(lambda: handed_back(redis, "late"))
    assert await redis.zscore(Q, "late") is not None  # still queued, for any worker
    assert await redis.llen(wake_key(Q)) >= 1  # type: ignore[misc]  # and another is woken
    gate.set()
    await served.task
    assert runner.ran == ["s1"]


async def test_stop_lets_running_jobs_finish_within_the_grace(
    redis: fakeredis.FakeAsyncRedis,
) -> None:
    gate = asyncio.Event()
    runner = Recorder(gate)
    served = Served(queue_for(redis), runner, shutdown_grace=5.0)
    await put(redis, "g1", 1)
    await served.running(1)
    served.worker.stop()
    await put(redis, "g2", 2)  # enqueued while stopping: not taken
    await asyncio.sleep(0.2)
    gate.set()
    await served.task
    assert runner.ran == ["g1"]
    assert result_from_blob(await redis.get("arq:result:g1")).ok
    assert await redis.zscore(Q, "g2") == 2


async def test_out_of_grace_a_running_job_is_handed_back(redis: fakeredis.FakeAsyncRedis) -> None:
    runner = Recorder(asyncio.Event())  # never set: the job would run for ever
    served = Served(queue_for(redis), runner, shutdown_grace=0.1)
    await put(redis, "h1", 1)
    await served.running(1)
    await served.stop()
    assert await redis.get("arq:result:h1") is None
    assert await handed_back(redis, "h1")
    assert await redis.zscore(Q, "h1") == 1


async def test_a_job_over_its_time_gets_a_failed_result(redis: fakeredis.FakeAsyncRedis) -> None:
    served = Served(queue_for(redis), Recorder(asyncio.Event()), job_timeout=0.2)
    await put(redis, "t1", 1)

    async def stored() -> bool:
        return int(await redis.exists("arq:result:t1")) == 1

    await until(stored)
    await served.stop()
    result = result_from_blob(await redis.get("arq:result:t1"))
    assert result.status == "failed"
    assert "TimeoutError" in (result.error or "")


# --- the route job's verdicts on what it was given -------------------------------------------


@pytest.fixture
def jobs() -> RouteJobs:
    settings = Settings(max_tries=3)
    return RouteJobs(Router(settings), settings)


def claimed(job_id: str, blob: Any, tries: int = 1) -> Claimed:
    raw = blob if blob is None or isinstance(blob, bytes) else json.dumps(blob).encode()
    return Claimed(job_id, lanes().interactive, 1, raw, tries)


async def test_a_job_that_cannot_run_is_answered_on_the_list_its_blob_names(
    jobs: RouteJobs,
) -> None:
    blob = {"t": 1, "f": "nope", "a": [], "k": {"reply_to": "llm_router:reply:p"}, "et": 1}
    finished = await jobs.run(claimed("p1", blob))
    assert isinstance(finished, Finished), finished
    assert (finished.success, finished.announce) == (False, False)
    assert finished.reply_to == "llm_router:reply:p"
    assert finished.result.status == "invalid_request"
    assert finished.result.error == "unknown job function: function 'nope' not found"


async def test_a_job_over_max_tries_fails_without_running(jobs: RouteJobs) -> None:
    blob = {"t": 1, "f": "route", "a": [{"messages": []}], "k": {}, "et": 1}
    finished = await jobs.run(claimed("p2", blob, tries=4))
    assert isinstance(finished, Finished), finished
    assert finished.result.status == "failed"
    assert "not tried again" in (finished.result.error or "")
    assert finished.result.attempts == []


async def test_an_expired_or_unreadable_job_gets_its_result(jobs: RouteJobs) -> None:
    expired = await jobs.run(claimed("p3", None))
    assert isinstance(expired, Finished)
    assert expired.result.error == "JobExecutionFailed: job expired"
    pickled = await jobs.run(claimed("p4", b"\x80\x04K\x01."))
    assert isinstance(pickled, Finished)
    assert pickled.result.status == "invalid_request"
    assert pickled.result.error == (
        "job payload is not a JSON arq job: pickle payloads are refused; jobs must be JSON"
    )


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


def test_batch_work_keeps_to_its_share_of_the_slots() -> None:
    lane = lanes(max_jobs=5, batch_max_jobs=3)
    assert lane.names == [Q, Q + ":batch"]
    batch = lane.queues[1]
    assert (batch.max_jobs, batch.keep_result_s) == (3, 600)
    batch.running = 3
    assert lane.wants(2) == [2, 0]
    assert lane.wake_keys(2) == [Q + ":wake"]
