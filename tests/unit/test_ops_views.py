"""What ``llm-router status``, ``health`` and ``metrics --follow`` show, from fixed data."""

from __future__ import annotations

import io
import json
import re
import time
from typing import Any

import pytest
from redis.asyncio import Redis
from rich.console import Console, RenderableType

from llm_router.client.counters import ModelCounts, parse_counters
from llm_router.client.follow import attempts_line, event_line, short_model, styled_line
from llm_router.client.health import check, verdict
from llm_router.client.heartbeats import Heartbeat
from llm_router.client.keys import (
    BREAKER_PREFIX,
    METRICS_COUNTERS_KEY,
    WORKERS_KEY,
    heartbeat_key,
    spend_key,
)
from llm_router.client.spend import ChainSpend, DaySpend, utc_day
from llm_router.client.status import (
    Breaker,
    QueueDepth,
    Status,
    as_json,
    collect,
    merge_breakers,
    render,
)

NOW = 1_800_000_000.0
QUEUE, BATCH = "llm_router:queue", "llm_router:batch"
QWEN = "ollama_chat/qwen2.5:7b"
HAIKU = "anthropic/claude-haiku-4-5-20251001"


def beat(worker_id: str, **fields: Any) -> Heartbeat:
    values: dict[str, Any] = {
        "worker_id": worker_id,
        "host": "piha",
        "pid": 4242,
        "version": "0.1.0",
        "started_at": NOW - 3725,
        "at": NOW - 1,
        "queues": [QUEUE, BATCH],
        "max_jobs": 4,
        "batch_max_jobs": 1,
        **fields,
    }
    return Heartbeat.model_validate(values)


def row(text: str, first: str) -> list[str]:
    """The cells of the table line that starts with the cell ``first``."""
    for line in text.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] == first and len(cells) > 1:  # not a wrapped cell's second line
            return cells
    raise AssertionError(f"no line starts with {first!r} in:\n{text}")


def text_of(renderable: RenderableType, width: int = 220) -> str:
    console = Console(file=io.StringIO(), width=width, record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


@pytest.fixture
def status() -> Status:
    workers = [
        beat(
            "0123456789abcdef",
            running={QUEUE: 2, BATCH: 1},
            done={"ok": 17, "failed": 2},
            last_job_at=NOW - 12,
            breakers={QWEN: "closed"},
            metrics_port=9464,
        ),
        beat(
            "fedcba9876543210",
            host="piha-2",
            pid=77,
            state="stopping",
            queues=[QUEUE],
            running={QUEUE: 1},
            breakers={QWEN: "open"},
        ),
    ]
    return Status(
        at=NOW,
        workers=workers,
        queues={
            QUEUE: QueueDepth(depth=7, running=3),
            BATCH: QueueDepth(depth=12, running=1, parked=9),
        },
        models={
            QWEN: ModelCounts(success=30, fallback=9, error=1, skipped=5),
            HAIKU: ModelCounts(success=0, fallback=0, error=0, skipped=2),
        },
        breakers={
            f"{HAIKU}@": Breaker(state="open", source="redis", failures=5, opened_at=NOW - 30),
            f"{QWEN}@http://localhost:11434": Breaker(state="closed", source="redis", failures=0),
        },
        spend_today=DaySpend(
            "2027-01-15",
            chains={
                "default": ChainSpend(spent_usd=0.125, calls=40, budget_usd=0.5),
                "batch": ChainSpend(spent_usd=0.01, calls=3),
            },
        ),
        open_batches=2,
        cache_hits=41,
    )


def test_status_screen_shows_workers_queues_models_breakers_and_spend(status: Status) -> None:
    text = text_of(render(status))
    assert "1 serving of 2 live workers · 4 jobs in flight · 41 answered from the cache" in text
    assert "2 Message Batches open" in text
    worker = next(line for line in text.splitlines() if "01234567" in line)
    assert "0123456789abcdef" not in text  # ids are shortened
    for cell in ("piha", "4242", "0.1.0", "serving", "1h02m", "3/4", "ok 17 failed 2", ":9464"):
        assert cell in worker, cell
    assert "12s ago" in worker
    assert QUEUE in worker
    assert BATCH in text.splitlines()[text.splitlines().index(worker) + 1]  # one queue a line
    other = next(line for line in text.splitlines() if "fedcba98" in line)
    assert "stopping" in other
    assert "1/4" in other
    # depth, pending, running, serving workers (the stopping one does not count)
    assert row(text, QUEUE) == [QUEUE, "7", "4", "3", "0", "1"]
    assert row(text, BATCH) == [BATCH, "12", "2", "1", "9", "1"]  # parked are not pending
    assert row(text, QWEN) == [QWEN, "30", "9", "1", "5", "75.0%"]
    assert row(text, HAIKU) == [HAIKU, "0", "0", "0", "2", "—"]  # only skipped: no rate
    # The open shared breaker is listed, the quiet closed one only counted.
    assert "Breakers (1 more closed)" in text
    assert row(text, f"{HAIKU}@") == [f"{HAIKU}@", "open", "5", "30s ago", "all (shared)"]
    assert "@http://localhost:11434" not in text
    assert "Spend today (2027-01-15 UTC): $0.1350" in text
    assert row(text, "default") == ["default", "40", "$0.1250", "$0.5000 (25%)"]
    assert row(text, "batch") == ["batch", "3", "$0.0100", "—"]


def test_status_screen_on_a_narrow_terminal_leaves_columns_out(status: Status) -> None:
    wide = text_of(render(status, 120), width=120)
    assert ":9464" in wide
    assert "piha:4242" in wide
    narrow = text_of(render(status, 80), width=80)
    assert max(len(line.rstrip()) for line in narrow.splitlines()) <= 80
    worker = next(line for line in narrow.splitlines() if "01234567" in line)
    for cell in ("serving", "1h02m", QUEUE, "3/4", "ok 17 failed 2"):
        assert cell in worker, cell  # whole, on one line
    assert ":9464" not in narrow
    assert "0.1.0" not in narrow


def test_status_screen_with_nothing_running() -> None:
    empty = Status(
        at=NOW,
        workers=[],
        queues={QUEUE: QueueDepth(3, 0)},
        models={},
        breakers={},
        spend_today=DaySpend("2027-01-15"),
    )
    text = text_of(render(empty))
    assert "Workers: none alive" in text
    assert "Models: no jobs counted" in text
    assert "Breakers: all closed" in text
    assert "Spend today (2027-01-15 UTC): nothing" in text


def test_status_json(status: Status) -> None:
    data = json.loads(json.dumps(as_json(status)))
    assert [w["worker_id"] for w in data["workers"]] == ["0123456789abcdef", "fedcba9876543210"]
    assert data["workers"][0]["running"] == {QUEUE: 2, BATCH: 1}
    assert data["workers"][0]["running_total"] == 3
    assert data["in_flight"] == 4
    assert data["queues"] == {
        QUEUE: {"depth": 7, "pending": 4, "running": 3, "parked": 0},
        BATCH: {"depth": 12, "pending": 2, "running": 1, "parked": 9},  # parked: not pending
    }
    assert QueueDepth(depth=0, running=1).pending == 0  # floored at 0
    assert data["open_batches"] == 2
    assert data["cache_hits"] == 41
    assert data["models"][QWEN]["success_rate"] == 0.75
    assert data["models"][HAIKU]["success_rate"] is None
    assert data["breakers"][f"{HAIKU}@"]["state"] == "open"
    assert data["spend_today"]["chains"]["default"]["budget_usd"] == 0.5
    assert data["spend_today"]["total_usd"] == 0.135


def test_breakers_merge_shared_hashes_and_heartbeats() -> None:
    workers = [
        beat("a" * 16, breakers={QWEN: "closed", HAIKU: "closed"}),
        beat("b" * 16, breakers={QWEN: "open", HAIKU: "half_open"}),
    ]
    shared = {f"{HAIKU}@": {b"state": b"half_open", b"failures": b"3", b"opened": b"1800000000000"}}
    breakers = merge_breakers(shared, workers)
    assert breakers[f"{HAIKU}@"] == Breaker("half_open", "redis", 3, NOW)
    assert HAIKU not in breakers  # the shared hash covers it
    assert breakers[QWEN].state == "open"  # the worst any worker saw
    assert breakers[QWEN].source == "heartbeat"
    assert breakers[QWEN].workers == ["a" * 16, "b" * 16]


def test_counters_parse_ignores_foreign_fields() -> None:
    raw = {b"m|success": b"3", b"a|b|error": b"1", b"m|weird": b"9", b"x|success": b"NaN"}
    counts = parse_counters(raw)
    assert counts == {
        "a|b": ModelCounts(success=0, fallback=0, error=1, skipped=0),
        "m": ModelCounts(success=3, fallback=0, error=0, skipped=0),
    }
    # The flat list a Lua script's HGETALL gives reads the same.
    flat = [k for pair in raw.items() for k in pair]
    assert parse_counters(flat) == counts


async def test_collect_reads_what_workers_leave(redis: Redis) -> None:
    now = time.time()
    one = beat("w1", at=now, started_at=now - 5, running={QUEUE: 2})
    await redis.set(heartbeat_key("w1"), one.model_dump_json(), ex=15)
    await redis.zadd(WORKERS_KEY, {"w1": int(now * 1000) + 15_000, "gone": int(now * 1000) - 1})
    await redis.zadd(QUEUE, {"j1": 1, "j2": 2, "j3": 3})
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hset(METRICS_COUNTERS_KEY, mapping={f"{QWEN}|success": 3, f"{QWEN}|error": 1})
        pipe.hset(BREAKER_PREFIX + f"{QWEN}@http://x", mapping={"state": "open"})
        pipe.set(BREAKER_PREFIX + "not-a-hash", "1")
        pipe.hset(spend_key(utc_day(now)), "chain|default|spent_nusd", "2000000")
        await pipe.execute()
    status = await collect(redis, [QUEUE, BATCH], now=now)
    assert [w.worker_id for w in status.workers] == ["w1"]
    assert status.queues[QUEUE] == QueueDepth(3, 2)
    assert status.queues[QUEUE].pending == 1
    assert status.queues[BATCH] == QueueDepth(0, 0)
    assert status.models[QWEN].success_rate == 0.75
    assert list(status.breakers) == [f"{QWEN}@http://x"]
    assert status.spend_today.chains["default"].spent_usd == 0.002


def test_health_verdicts() -> None:
    assert verdict([], QUEUE).line == (
        f"unhealthy: no live worker serves queue {QUEUE!r} (no live workers at all)"
    )
    others = [beat("a", queues=["q2"]), beat("b", queues=["q3"])]
    assert verdict(others, QUEUE).line == (
        f"unhealthy: no live worker serves queue {QUEUE!r} (2 workers serve other queues)"
    )
    stopping = [beat("a", state="stopping"), beat("b", queues=["q2"])]
    bad = verdict(stopping, QUEUE)
    assert not bad.ok
    assert bad.line.endswith("(1 worker stopping, 1 worker serves other queues)")
    good = verdict([*others, beat("c", running={QUEUE: 2}), beat("d", running={BATCH: 5})], QUEUE)
    assert good.ok
    assert good.line == f"healthy: 2 workers serve {QUEUE!r} (2 jobs running)"
    assert [w.worker_id for w in good.workers] == ["c", "d"]
    assert (
        verdict([beat("c")], QUEUE).line == f"healthy: 1 worker serves {QUEUE!r} (0 jobs running)"
    )


async def test_health_check_against_redis(redis: Redis, broken_redis: Redis) -> None:
    assert not (await check(redis, QUEUE)).ok
    now = time.time()
    await redis.set(heartbeat_key("w1"), beat("w1", at=now).model_dump_json(), ex=15)
    await redis.zadd(WORKERS_KEY, {"w1": int(now * 1000) + 15_000})
    assert (await check(redis, QUEUE)).ok
    away = await check(broken_redis, QUEUE)
    assert not away.ok
    assert away.line == "unhealthy: Redis at the configured URL does not answer: ConnectionError"


EVENT: dict[str, Any] = {
    "job_id": "6ec6349077624e3ea8525eecab87226e",
    "context": "billing.backfill",
    "chain": "default",
    "status": "ok",
    "model_used": HAIKU,
    "latency_ms": 76,
    "cost_usd": 0.00123,
    "attempts": [
        {"model": QWEN, "outcome": "rejected", "reason": "RefusalPattern", "latency_ms": 12},
        {"model": HAIKU, "outcome": "success", "latency_ms": 63, "retries": 2},
    ],
    "metrics_snapshot": {},
    "timestamp": NOW,
}


def test_follow_line_of_an_event() -> None:
    line = event_line(EVENT)
    clock = time.strftime("%H:%M:%S", time.localtime(NOW))
    assert line.startswith(f"{clock}  ok ")
    assert " default " in line
    assert f"  {HAIKU}  76 ms  $0.0012  qwen:rejected→haiku:success[2 retries]" in line
    assert line.endswith("context=billing.backfill")
    assert "\n" not in line


def test_follow_line_of_a_failure_and_of_foreign_messages() -> None:
    failed = {
        "status": "failed",
        "chain": None,
        "attempts": [{"model": "anthropic/claude-sonnet-4-6", "outcome": "skipped"}],
    }
    line = event_line(failed)
    assert "failed" in line
    assert "none  ? ms  $?  sonnet:skipped" in line
    assert styled_line("not json").plain == "not json"
    assert styled_line("[1, 2]").plain == "[1, 2]"
    assert styled_line(json.dumps(EVENT)).plain == event_line(EVENT)


@pytest.mark.parametrize(
    ("model", "short"),
    [
        (QWEN, "qwen"),
        (HAIKU, "haiku"),
        ("anthropic/claude-sonnet-4-6", "sonnet"),
        ("openai/gpt-4o-mini", "gpt"),
        ("7b", "7b"),
    ],
)
def test_short_model(model: str, short: str) -> None:
    assert short_model(model) == short


def test_attempts_line_tolerates_junk() -> None:
    assert attempts_line(None) == ""
    assert attempts_line([1, {"outcome": "success"}]) == "?:success"
