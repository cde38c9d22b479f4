"""The worker's Redis scripts and failure paths, against fakeredis (Lua included)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import pytest
from arq.worker import func

from llm_router.client.protocol import wake_key
from llm_router.worker.daemon import (
    _CLAIM_LUA,
    _FINISH_LUA,
    _RENEW_LUA,
    RedisOutage,
    RouterWorker,
    reply_to_of,
)
from llm_router.worker.jobs import serialize

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
    )
    w._finish = redis.register_script(_FINISH_LUA)
    return w


async def claim(
    redis: fakeredis.FakeAsyncRedis, token: str, want: int, scan: int = 2000
) -> list[str]:
    out = await redis.eval(_CLAIM_LUA, 1, Q, 10**13, 10_000, want, IP, token, scan)  # type: ignore[misc, arg-type]
    return [out[i].decode() for i in range(0, len(out), 2)]


async def test_claim_skips_jobs_others_are_running(redis: fakeredis.FakeAsyncRedis) -> None:
    await redis.zadd(Q, {f"j{n}": n for n in range(5)})
    for n in range(3):
        await redis.set(f"{IP}j{n}", "other")
    assert await claim(redis, "me", 2) == ["j3", "j4"]
    assert await redis.get(f"{IP}j3") == b"me"
    assert await claim(redis, "you", 2) == []  # nothing left to take


async def test_claim_pages_past_a_long_head_of_running_jobs(
    redis: fakeredis.FakeAsyncRedis,
) -> None:
    await redis.zadd(Q, {f"j{n:04}": n for n in range(350)})
    for n in range(300):
        await redis.set(f"{IP}j{n:04}", "other")
    assert await claim(redis, "me", 3) == ["j0300", "j0301", "j0302"]
    assert await claim(redis, "me", 3, scan=100) == []  # bounded by the scan limit


async def test_renew_extends_only_own_leases(redis: fakeredis.FakeAsyncRedis) -> None:
    await redis.set(f"{IP}a", "me", px=1000)
    await redis.set(f"{IP}b", "other", px=1000)
    lost = await redis.eval(_RENEW_LUA, 3, f"{IP}a", f"{IP}b", f"{IP}c", "me", 60_000)  # type: ignore[misc, arg-type]
    assert sorted(lost) == [f"{IP}b".encode(), f"{IP}c".encode()]
    assert await redis.pttl(f"{IP}a") > 50_000
    assert await redis.pttl(f"{IP}b") <= 1000


def finish_keys(job_id: str, reply_to: str = "") -> list[str]:
    return [f"arq:result:{job_id}", f"{IP}{job_id}", f"arq:retry:{job_id}",
            f"arq:job:{job_id}", Q, "arq:abort", reply_to, wake_key(Q)]  # fmt: skip


async def finish(redis: fakeredis.FakeAsyncRedis, job_id: str, token: str, blob: str,
                 reply_to: str = "") -> int:  # fmt: skip
    args = [job_id, token, blob, 60_000, 600, 100]
    return int(await redis.eval(_FINISH_LUA, 8, *finish_keys(job_id, reply_to), *args))  # type: ignore[misc, arg-type]


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
    await redis.set("arq:job:p1", json.dumps(blob))
    await redis.set(f"{IP}p1", worker.token)
    result = serialize({"id": "p1", "r": RuntimeError("boom")})
    await worker.finish_failed_job("p1", result)
    pushed = await redis.lrange("llm_router:reply:p", 0, -1)  # type: ignore[misc]
    assert len(pushed) == 1
    assert json.loads(pushed[0])["r"]["status"] == "failed"


async def test_failed_job_without_a_serializable_result_still_gets_one(
    worker: RouterWorker, redis: fakeredis.FakeAsyncRedis
) -> None:
    await redis.set(f"{IP}p2", worker.token)
    await worker.finish_failed_job("p2", None)
    stored = await redis.get("arq:result:p2")
    assert stored is not None
    assert json.loads(stored)["r"]["status"] == "failed"


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
