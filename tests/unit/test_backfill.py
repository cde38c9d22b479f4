"""``llm-router backfill`` against fakeredis, with a fake worker that finishes jobs the way
the real one does: result key, reply pushed to the job's ``reply_to``, job key gone."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

import fakeredis
import pytest
from redis.asyncio import Redis
from redis.exceptions import OutOfMemoryError, RedisError
from rich.console import Console

from llm_router.client import backfill as engine
from llm_router.client import cli, rows
from llm_router.client.backfill import Backfill, BackfillSummary
from llm_router.client.client import build_request
from llm_router.client.idset import IdSet
from llm_router.client.keys import DEFAULT_BATCH_QUEUE, REPLY_PREFIX, job_key, result_key, wake_key
from llm_router.client.progress import PlainProgress, RateMeter, TerminalProgress
from llm_router.client.protocol import (
    REPLY_TTL_S,
    WAKE_TOKENS_MAX,
    Attempt,
    RouteResult,
    decode,
    encode,
    job_blob,
    result_from_blob,
)
from llm_router.client.rows import (
    BackfillError,
    RowParser,
    RowRef,
    derived_id,
    failure_reason,
    job_id_for,
    output_row,
    reply_key_for,
    run_key,
)
from llm_router.client.schemas import canonical_json
from tests.unit.blobs import NO_USAGE, result_blob

QUEUE = "test:batch"
SCHEMA: dict[str, Any] = {"type": "object", "required": ["a"]}

Answer = Callable[[str, dict[str, Any]], RouteResult]


def echo(job_id: str, request: dict[str, Any]) -> RouteResult:
    """ok with the last message's text; ``failed`` (a timeout) when it asks for it."""
    text = request["messages"][-1]["content"]
    common: dict[str, Any] = {"job_id": job_id, "metadata": request.get("metadata", {})}
    if "please fail" in text:
        return RouteResult(
            status="failed",
            attempts=[
                Attempt(model="m1", outcome="skipped", reason="busy", latency_ms=0),
                Attempt(model="m2", outcome="rejected", reason="Timeout after 8.0s", latency_ms=8),
            ],
            error="all 2 models in chain 'batch' failed",
            **common,
        )
    model = "m2" if "cloud" in text else "m1"
    attempts = [Attempt(model=model, outcome="success", latency_ms=3)]
    return RouteResult(
        status="ok", content=text.upper(), model_used=model, attempts=attempts, **common
    )


class FakeWorker:
    """Takes jobs off the batch queue and finishes them as the worker's FINISH script does."""

    def __init__(
        self, redis: Redis, queue: str = QUEUE, *, answer: Answer = echo, push: bool = True
    ) -> None:
        self.redis = redis
        self.queue = queue
        self.answer = answer
        self.push = push
        self.routed: list[str] = []
        self.requests: dict[str, dict[str, Any]] = {}
        self.limit: int | None = None  # stop taking jobs after this many

    async def run_once(self) -> int:
        room = 50 if self.limit is None else min(50, self.limit - len(self.routed))
        if room <= 0:
            return 0
        popped = await self.redis.zpopmin(self.queue, room)
        for member, _ in popped:
            job_id = member.decode()
            blob = await self.redis.get(job_key(job_id))
            assert blob is not None, f"queued job {job_id} has no blob"
            job = decode(blob)
            request = job["a"][0]
            self.requests[job_id] = job
            self.routed.append(job_id)
            stored = result_blob(self.answer(job_id, request), job_id)
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(result_key(job_id), stored)
                reply_to = job["k"].get("reply_to")
                if self.push and reply_to and reply_to.startswith(REPLY_PREFIX):
                    pipe.lpush(reply_to, stored)
                    pipe.expire(reply_to, REPLY_TTL_S)
                pipe.delete(job_key(job_id))
                await pipe.execute()
        return len(popped)

    async def run(self) -> None:
        """Until :meth:`halt`: never cancelled mid-round, which would lose popped jobs."""
        self._halt = False
        while not self._halt:
            if not await self.run_once():
                await asyncio.sleep(0.005)

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.run())
        return self._task

    async def halt(self) -> None:
        self._halt = True
        await self._task

    async def drain(self) -> None:
        while await self.run_once():
            pass


def write_lines(path: Path, rows: Iterable[dict[str, Any] | str]) -> Path:
    with path.open("w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def read_rows(path: Path) -> list[dict[str, Any]]:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), "the output ends in a half line"
    return [json.loads(line) for line in data.splitlines()]


def read_rows_whole(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a file that may end in a half line."""
    return [json.loads(line) for line in path.read_bytes().split(b"\n")[:-1]]


def prompts(n: int) -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "prompt": f"row {i}", "metadata": {"row": f"r{i}"}} for i in range(n)]


#: fakeredis lets a BLPOP cancelled by a stopped run pop the next push (real Redis does not:
#: redis-py drops the connection), so a rerun in the same test loses one reply to it and
#: needs the safety net, made quick here.
QUICK_SWEEP: dict[str, Any] = {"sweep_every": 0.1, "sweep_age": 0.0}


def make(redis: Redis, source: Path, output: Path, **kwargs: Any) -> Backfill:
    kwargs.setdefault("batch_queue", QUEUE)
    return Backfill(redis, source, output, **kwargs)


async def run_with(worker: FakeWorker | None, backfill: Backfill) -> BackfillSummary:
    if worker is not None:
        worker.start()
    try:
        async with asyncio.timeout(20):
            return await backfill.run()
    finally:
        if worker is not None:
            await worker.halt()


async def run_until(backfill: Backfill, done: Callable[[BackfillSummary], bool]) -> BackfillSummary:
    """Run without a worker and stop() as soon as ``done`` holds."""

    def watch(summary: BackfillSummary) -> None:
        if summary.ended == "running" and done(summary):
            backfill.stop()

    backfill.on_progress = watch
    async with asyncio.timeout(20):
        return await backfill.run()


async def result_keys(redis: Redis) -> list[bytes]:
    return [k async for k in redis.scan_iter("arq:result:*")]


# --- IdSet --------------------------------------------------------------------------------


def test_idset_adds_finds_and_refuses_repeats() -> None:
    ids = IdSet()
    assert ids.add("a")
    assert ids.add("b")
    assert not ids.add("a")
    assert "a" in ids
    assert "b" in ids
    assert "c" not in ids
    assert 7 not in ids
    assert len(ids) == 2


def test_idset_keeps_every_id_through_growth_at_a_few_bytes_each() -> None:
    ids = IdSet()
    n = 100_000
    for i in range(n):
        assert ids.add(f"row-{i}")
    assert len(ids) == n
    assert all(f"row-{i}" in ids for i in range(n))
    assert not any(f"other-{i}" in ids for i in range(10_000))
    assert ids.nbytes / n <= 24  # 8-byte slots at a load of 3/8 to 3/4
    assert IdSet(expected=n).nbytes <= ids.nbytes  # sized up front: no growth needed


def test_idset_keeps_seen_and_written_apart_in_one_slot_through_growth() -> None:
    ids = IdSet()
    assert ids.add("a", IdSet.WRITTEN)  # from the output file
    assert not ids.has("a", IdSet.SEEN)
    assert ids.add("a", IdSet.SEEN)  # then met in the input: not a duplicate
    assert not ids.add("a", IdSet.SEEN)  # met again: a duplicate
    assert not ids.add("a", IdSet.WRITTEN)
    assert ids.add("b", IdSet.SEEN)
    assert not ids.has("b", IdSet.WRITTEN)
    for i in range(5000):
        ids.add(f"w{i}", IdSet.WRITTEN if i % 2 else IdSet.SEEN)
    assert len(ids) == 5002
    assert ids.has("a", IdSet.SEEN)
    assert ids.has("a", IdSet.WRITTEN)
    assert not ids.has("b", IdSet.WRITTEN)
    assert all(ids.has(f"w{i}", IdSet.WRITTEN) == bool(i % 2) for i in range(5000))
    assert all(ids.has(f"w{i}", IdSet.SEEN) != bool(i % 2) for i in range(5000))


def test_idset_hashes_leave_the_flag_bits_and_the_empty_marker_free() -> None:
    keys = [IdSet.hash(f"x{i}") for i in range(10_000)]
    assert all(k != 0 and k & 3 == 0 for k in keys)
    assert len(set(keys)) == len(keys)


# --- rows, ids, output --------------------------------------------------------------------


def test_job_ids_tie_reruns_of_one_output_file_and_nothing_else(tmp_path: Path) -> None:
    request = build_request("hello", metadata={"b": 1, "a": 2})
    same = build_request("hello", metadata={"a": 2, "b": 1})  # key order does not matter
    key = run_key(tmp_path / "out.jsonl")
    assert key == os.path.realpath(tmp_path / "out.jsonl")
    first = job_id_for(key, "r1", request)
    assert first.startswith("backfill:")
    assert len(first) == len("backfill:") + 40
    assert job_id_for(key, "r1", same) == first
    assert job_id_for(key, "r2", request) != first
    assert job_id_for(run_key(tmp_path / "other.jsonl"), "r1", request) != first
    assert job_id_for(key, "r1", build_request("hello!")) != first
    assert reply_key_for(key) == reply_key_for(run_key(tmp_path / "out.jsonl"))
    assert reply_key_for(key).startswith(REPLY_PREFIX + "backfill:")
    assert reply_key_for(key) != reply_key_for(run_key(tmp_path / "other.jsonl"))


def test_the_job_blob_is_protocol_job_blob_and_the_id_hashes_canonical_json() -> None:
    request = build_request(
        [{"role": "user", "content": "zürich ☃", "name": "x"}],
        schema=SCHEMA,
        context="nightly",
        metadata={"z": [1, 2.5, None], "a": {"é": True}},
    )
    reply = REPLY_PREFIX + "backfill:abc"
    ours = rows.job_blob_of(rows.canonical_request(request), 1234, reply)
    assert decode(ours) == decode(job_blob(request, 1234, reply_to=reply))
    assert len(ours) == len(job_blob(request, 1234, reply_to=reply))
    text = f"/out\0r1\0{canonical_json(request.wire())}".encode()
    expected = "backfill:" + hashlib.sha256(text).hexdigest()[:40]
    assert job_id_for("/out", "r1", request) == expected
    assert job_id_for("/out", "r1", rows.canonical_request(request)) == expected


def test_derived_ids_depend_on_line_number_and_content_only() -> None:
    assert derived_id(3, b'{"prompt": "x"}\n') == derived_id(3, b'{"prompt": "x"}')
    assert derived_id(3, b'{"prompt": "x"}\n') != derived_id(4, b'{"prompt": "x"}\n')
    assert derived_id(3, b'{"prompt": "x"}\n') != derived_id(3, b'{"prompt": "y"}\n')
    assert derived_id(3, b"x").startswith("line3-")


def test_parser_reads_rows_and_says_what_is_wrong() -> None:
    parser = RowParser(schema=SCHEMA, chain="batch", context="nightly")
    claim = parser.claim(1, b'{"id": 42, "prompt": "hi"}\n')
    assert claim.id == "42"
    request = parser.request(claim)
    assert request.json_schema == SCHEMA
    assert request.chain == "batch"
    assert request.context == "nightly"
    own = parser.request(parser.claim(2, b'{"prompt": "hi", "schema": null}'))
    assert own.json_schema is None  # a row's own schema wins, even null
    assert RowParser().request(RowParser.claim(3, b'{"prompt": "hi"}')).chain is None
    bad = {
        b"[1, 2]": "expected a JSON object",
        b'{"prompt": "x", "system": "s"}': "unknown field",
        b'{"id": [1], "prompt": "x"}': "id must be a string or an integer",
        b'{"id": true, "prompt": "x"}': "id must be a string or an integer",
        b'{"id": null, "prompt": "x"}': "not null",
        b"{not json": "not JSON",
        b"[" * 100_000: "nested too deeply|not JSON",
    }
    for raw, why in bad.items():
        with pytest.raises(ValueError, match=why):
            RowParser.claim(1, raw)
    invalid = {
        b'{"messages": [], "prompt": "x"}': "exactly one",
        b'{"id": "a"}': "exactly one",
        b'{"messages": "text"}': "must be a list",
        b'{"prompt": 5}': "must be a string",
        b'{"messages": [{"role": "robot", "content": "x"}]}': "role",
        b'{"prompt": "x", "schema": {"type": "nope"}}': "invalid JSON Schema",
        b'{"prompt": "x", "metadata": [1]}': "metadata",
        b'{"prompt": "x\\ud800"}': "surrogate",
    }
    for raw, why in invalid.items():
        with pytest.raises(ValueError, match=why):
            parser.request(RowParser.claim(1, raw))


def test_a_bad_shared_schema_or_context_is_refused_up_front() -> None:
    with pytest.raises(ValueError, match="invalid JSON Schema"):
        RowParser(schema={"type": "nope"})
    with pytest.raises(ValueError, match="context"):
        RowParser(context="x" * 201)


def test_output_row_has_the_documented_fields() -> None:
    result = echo("j", {"messages": [{"role": "user", "content": "hi"}]})
    row = output_row(RowRef.of("r1", 7, None), result)
    assert list(row) == [
        "id", "line", "status", "content", "model_used", "attempts", "latency_ms", "error",
        "cost_usd",
    ]  # fmt: skip
    assert row["attempts"] == [
        {
            "model": "m1",
            "outcome": "success",
            "reason": None,
            "latency_ms": 3,
            "load_ms": None,
            "retries": 0,
            "retry_error": None,
            **NO_USAGE,
        }
    ]
    assert output_row(RowRef.of("r1", 7, {"k": 1}), result)["metadata"] == {"k": 1}


def test_failure_reasons_are_short_classes() -> None:
    failed = echo("j", {"messages": [{"role": "user", "content": "please fail"}]})
    assert failure_reason(failed) == "Timeout"  # the first rejection, not the skip
    assert failure_reason(RouteResult(status="failed", error="TimeoutError: ")) == "TimeoutError"
    assert failure_reason(RouteResult(status="invalid_request", error="x")) == "invalid"
    assert failure_reason(RouteResult(status="ok")) is None


# --- runs ---------------------------------------------------------------------------------


async def test_every_row_is_routed_and_written_once(redis: Redis, tmp_path: Path) -> None:
    rows: list[dict[str, Any] | str] = [
        {"id": "a", "prompt": "first", "metadata": {"ticket": 1}},
        {
            "id": 2,
            "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
        },
        {"prompt": "no id here"},
        "",
        "   ",
        {"id": "f", "prompt": "please fail"},
        {"id": "c", "prompt": "go cloud", "schema": SCHEMA},
    ]
    rows += [{"id": f"bulk{i}", "prompt": f"bulk {i}"} for i in range(150)]
    source = write_lines(tmp_path / "in.jsonl", rows)
    output = tmp_path / "out.jsonl"
    worker = FakeWorker(redis)
    in_flight_seen: list[int] = []
    backfill = make(redis, source, output, max_in_flight=20, context="nightly")
    backfill.on_progress = lambda s: in_flight_seen.append(s.in_flight)

    summary = await run_with(worker, backfill)

    out = read_rows(output)
    assert len(out) == 155
    assert summary.total == 155
    assert Counter(r["id"] for r in out).most_common(1)[0][1] == 1
    by_id = {r["id"]: r for r in out}
    assert by_id["a"]["content"] == "FIRST"
    assert by_id["a"]["metadata"] == {"ticket": 1}
    assert by_id["a"]["line"] == 1
    assert by_id["2"]["content"] == "U"
    assert "metadata" not in by_id["2"]
    assert by_id[derived_id(3, b'{"prompt": "no id here"}')]["content"] == "NO ID HERE"
    assert by_id["f"]["status"] == "failed"
    assert by_id["f"]["line"] == 6
    assert by_id["f"]["attempts"][1]["reason"] == "Timeout after 8.0s"
    assert by_id["c"]["model_used"] == "m2"
    assert summary.ended == "complete"
    assert summary.missing == 0
    assert (summary.written, summary.ok, summary.failed, summary.invalid) == (155, 154, 1, 0)
    assert summary.per_model == {"m1": 153, "m2": 1}
    assert summary.per_reason == {"Timeout": 1}
    assert summary.enqueued == 155
    assert max(in_flight_seen) <= 20
    # The jobs as the worker got them: the lane's chain (none sent), the run's reply list.
    assert len(worker.routed) == len(set(worker.routed)) == 155
    reply = reply_key_for(run_key(output))
    for job_id, job in worker.requests.items():
        assert job_id.startswith("backfill:")
        assert job["k"] == {"reply_to": reply}
        assert "chain" not in job["a"][0]
        assert job["a"][0]["context"] == "nightly"
    schemas = [j["a"][0].get("schema") for j in worker.requests.values()]
    assert schemas.count(SCHEMA) == 1
    # Written and fsynced, so their results are gone from Redis.
    assert await result_keys(redis) == []


async def test_invalid_lines_become_rows_with_their_line_number_and_are_never_queued(
    redis: Redis, tmp_path: Path
) -> None:
    lines: list[dict[str, Any] | str] = [
        {"id": "ok1", "prompt": "fine"},
        "not json at all",
        "[1, 2, 3]",
        {"id": "x", "prompt": "hi", "colour": "blue"},
        {"id": "s", "prompt": "hi", "schema": {"type": 12}},
        {"id": "ok1", "prompt": "same id again"},
        {"messages": "a string"},
        '{"prompt": "cut short',
        {"id": "ok2", "prompt": "fine too"},
    ]
    source = write_lines(tmp_path / "in.jsonl", lines)
    output = tmp_path / "out.jsonl"
    worker = FakeWorker(redis)

    summary = await run_with(worker, make(redis, source, output))

    out = {r["line"]: r for r in read_rows(output)}
    assert sorted(out) == list(range(1, 10))
    assert [out[n]["status"] for n in (1, 9)] == ["ok", "ok"]
    for n in range(2, 9):
        assert out[n]["status"] == "invalid_request", out[n]
        assert out[n]["error"].startswith(f"line {n}: "), out[n]
    assert "not JSON" in out[2]["error"]
    assert "'colour'" in out[4]["error"]
    assert out[4]["id"].startswith("line4-")
    assert out[5]["id"] == "s"  # its id was usable, so the row keeps it
    assert "duplicate id 'ok1'" in out[6]["error"]
    assert out[6]["id"] != "ok1"
    assert out[1]["content"] == "FINE"  # the first of the two 'ok1' lines won
    assert len(worker.routed) == 2
    assert (summary.ok, summary.invalid, summary.missing) == (2, 7, 0)
    assert summary.per_reason == {"invalid": 7}

    # A rerun finds every row done, the duplicate's included.
    again = await run_with(None, make(redis, source, output))
    assert (again.already_done, again.written, again.missing) == (9, 0, 0)
    assert len(read_rows(output)) == 9


async def test_in_flight_rows_are_bounded_and_wake_up_tokens_capped(
    redis: Redis, tmp_path: Path
) -> None:
    source = write_lines(tmp_path / "in.jsonl", prompts(40))
    summary = await run_until(
        make(redis, source, tmp_path / "out.jsonl", max_in_flight=7), lambda s: s.enqueued >= 7
    )
    await asyncio.sleep(0.05)
    assert (summary.in_flight, summary.enqueued, summary.missing) == (7, 7, 40)
    assert summary.ended == "interrupted"
    assert await redis.zcard(QUEUE) == 7
    assert await redis.llen(wake_key(QUEUE)) == 7  # type: ignore[misc]

    many = write_lines(tmp_path / "many.jsonl", prompts(250))
    await run_until(make(redis, many, tmp_path / "many-out.jsonl"), lambda s: s.enqueued >= 250)
    assert await redis.zcard(QUEUE) == 257
    assert await redis.llen(wake_key(QUEUE)) == WAKE_TOKENS_MAX  # type: ignore[misc]
    # Only the job, queue and wake-up keys: no hand-over to idle workers.
    assert [k async for k in redis.scan_iter("arq:in-progress:*")] == []
    assert [k async for k in redis.scan_iter("arq:retry:*")] == []


async def test_batch_queue_comes_from_the_environment(
    redis: Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = write_lines(tmp_path / "in.jsonl", prompts(3))
    await run_until(Backfill(redis, source, tmp_path / "a.jsonl"), lambda s: s.enqueued >= 3)
    assert await redis.zcard(DEFAULT_BATCH_QUEUE) == 3
    monkeypatch.setenv("LLM_ROUTER_BATCH_QUEUE_NAME", "env:batch")
    await run_until(Backfill(redis, source, tmp_path / "b.jsonl"), lambda s: s.enqueued >= 3)
    assert await redis.zcard("env:batch") == 3


class Killed(Exception):
    """The process died: nothing after this reaches the disk."""


async def test_killed_mid_run_with_a_torn_line_then_resumed_writes_every_row_once(
    redis: Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = write_lines(tmp_path / "in.jsonl", prompts(400))
    output = tmp_path / "out.jsonl"
    worker = FakeWorker(redis)
    worker.limit = 300  # the rest stays queued when the run dies
    real_write = rows.OutputFile.write_durably
    writes = 0

    def dying_write(self: rows.OutputFile, data: bytes) -> None:
        nonlocal writes
        writes += 1
        if writes == 1:
            return real_write(self, data)
        if writes == 2:  # the kill lands in the middle of a write: half a line on disk
            assert self._fd is not None
            cut = data.rfind(b"\n", 0, len(data) // 2) + 1  # whole lines, then 5 bytes
            os.write(self._fd, data[: cut + 5])
        raise Killed  # and nothing after it reaches the disk (nor Redis: no DEL)

    monkeypatch.setattr(engine, "_FLUSH_ROWS", 50)
    monkeypatch.setattr(rows.OutputFile, "write_durably", dying_write)
    worker.start()
    with pytest.raises(Killed):
        async with asyncio.timeout(20):
            await make(redis, source, output, max_in_flight=100).run()
    assert not output.read_bytes().endswith(b"\n")  # torn
    assert 0 < output.read_bytes().count(b"\n") < 400
    popped_not_written = len(await result_keys(redis))
    assert popped_not_written > 0  # their replies were taken: only the result keys have them
    assert len(read_rows_whole(output)) > 0
    # While no backfill runs, the worker finishes what is queued (replies nobody pops).
    await worker.halt()
    worker.limit = None
    await worker.drain()
    monkeypatch.setattr(rows.OutputFile, "write_durably", real_write)

    summary = await run_with(worker, make(redis, source, output, max_in_flight=100, **QUICK_SWEEP))

    out = read_rows(output)
    assert sorted(r["id"] for r in out) == sorted(f"r{i}" for i in range(400))
    assert all(r["status"] == "ok" and r["content"] == f"ROW {r['id'][1:]}" for r in out)
    assert summary.missing == 0
    assert summary.ended == "complete"
    assert summary.already_done + summary.written == 400
    assert len(worker.routed) == len(set(worker.routed)) == 400  # none routed twice
    # The rows the kill caught between their write and the DEL of their results were
    # skipped as done, and their results deleted then: nothing is left in Redis.
    assert await result_keys(redis) == []


async def test_results_finished_while_away_are_collected_by_the_enqueue_script(
    redis: Redis, tmp_path: Path
) -> None:
    source = write_lines(tmp_path / "in.jsonl", prompts(120))
    output = tmp_path / "out.jsonl"
    first = await run_until(make(redis, source, output), lambda s: s.enqueued >= 120)
    assert (first.written, first.in_flight) == (0, 120)
    worker = FakeWorker(redis, push=False)  # results stored only: no reply to hear
    await worker.drain()
    assert len(await result_keys(redis)) == 120

    summary = await run_with(None, make(redis, source, output))

    assert (summary.written, summary.enqueued, summary.missing) == (120, 0, 0)
    assert await redis.zcard(QUEUE) == 0
    assert len(read_rows(output)) == 120
    assert await result_keys(redis) == []


async def test_a_rerun_waits_for_jobs_still_queued_and_does_not_queue_them_again(
    redis: Redis, tmp_path: Path
) -> None:
    source = write_lines(tmp_path / "in.jsonl", prompts(60))
    output = tmp_path / "out.jsonl"
    await run_until(make(redis, source, output), lambda s: s.enqueued >= 60)
    worker = FakeWorker(redis)

    summary = await run_with(worker, make(redis, source, output, **QUICK_SWEEP))

    assert (summary.written, summary.enqueued) == (60, 0)  # found queued: not queued again
    assert len(worker.routed) == len(set(worker.routed)) == 60


async def test_leftover_and_repeated_replies_are_ignored(redis: Redis, tmp_path: Path) -> None:
    source = write_lines(tmp_path / "in.jsonl", prompts(50))
    output = tmp_path / "out.jsonl"
    reply = reply_key_for(run_key(output))
    stranger = RouteResult(status="ok", content="not ours", job_id="backfill:nobody")
    await redis.lpush(reply, result_blob(stranger, "backfill:nobody"), b"garbage", b"{}")  # type: ignore[misc]
    worker = FakeWorker(redis)
    original = worker.run_once

    async def push_again() -> int:
        n = await original()
        for job_id in worker.routed[-n:] if n else []:
            blob = await redis.get(result_key(job_id))
            if blob is not None:
                await redis.lpush(reply, blob)  # type: ignore[misc]  # a second copy
        return n

    worker.run_once = push_again  # type: ignore[method-assign]
    summary = await run_with(worker, make(redis, source, output))

    out = read_rows(output)
    assert sorted(r["id"] for r in out) == sorted(f"r{i}" for i in range(50))
    assert "not ours" not in {r["content"] for r in out}
    assert summary.written == 50


async def test_the_safety_net_finds_results_without_a_reply(redis: Redis, tmp_path: Path) -> None:
    source = write_lines(tmp_path / "in.jsonl", prompts(30))
    worker = FakeWorker(redis, push=False)
    backfill = make(redis, source, tmp_path / "out.jsonl", sweep_every=0.05, sweep_age=0.0)

    summary = await run_with(worker, backfill)

    assert (summary.written, summary.missing) == (30, 0)


async def test_a_half_written_last_line_is_cut_and_done_rows_are_skipped(
    redis: Redis, tmp_path: Path
) -> None:
    source = write_lines(tmp_path / "in.jsonl", prompts(10))
    output = tmp_path / "out.jsonl"
    done = [{"id": "r0", "line": 1, "status": "ok", "content": "FROM BEFORE"}, {"id": "r1"}]
    output.write_bytes(b"".join(encode(r) + b"\n" for r in done) + b'{"id": "r2", "sta')
    worker = FakeWorker(redis)

    summary = await run_with(worker, make(redis, source, output))

    out = read_rows(output)
    assert [r["id"] for r in out[:2]] == ["r0", "r1"]
    assert sorted(r["id"] for r in out) == sorted(f"r{i}" for i in range(10))
    assert (summary.already_done, summary.written, summary.missing) == (2, 8, 0)
    routed_rows = {job["a"][0]["metadata"]["row"] for job in worker.requests.values()}
    assert routed_rows == {f"r{i}" for i in range(2, 10)}  # r0 and r1 were done


async def test_an_output_that_is_not_ours_is_refused(redis: Redis, tmp_path: Path) -> None:
    source = write_lines(tmp_path / "in.jsonl", prompts(2))
    output = tmp_path / "out.jsonl"
    output.write_text("hello world\n")
    with pytest.raises(BackfillError, match="line 1"):
        await make(redis, source, output).run()
    with pytest.raises(BackfillError, match="must not be the input"):
        await make(redis, source, source).run()
    assert output.read_text() == "hello world\n"


async def test_rows_are_on_disk_before_their_results_leave_redis(
    redis: Redis, fake_server: fakeredis.FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = write_lines(tmp_path / "in.jsonl", prompts(300))
    output = tmp_path / "out.jsonl"
    durable: set[str] = set()
    violations: list[str] = []
    deleted: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        real_fsync(fd)
        if output.exists():
            durable.update(json.loads(line)["id"] for line in output.read_bytes().splitlines())

    sync = fakeredis.FakeRedis(server=fake_server)
    real_delete = redis.delete

    async def checking_delete(*keys: Any) -> Any:
        for key in keys:
            blob = cast("bytes | None", sync.get(key))
            if blob is None:
                continue
            row = result_from_blob(blob).metadata["row"]
            deleted.append(row)
            if row not in durable:
                violations.append(row)
        return await real_delete(*keys)

    monkeypatch.setattr(engine, "_FLUSH_ROWS", 40)  # many flushes, many deletes
    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(redis, "delete", checking_delete)
    summary = await run_with(FakeWorker(redis), make(redis, source, output, max_in_flight=50))

    assert summary.written == 300
    assert violations == []
    assert sorted(deleted) == sorted(f"r{i}" for i in range(300))
    assert sync.keys("arq:result:*") == []


async def test_stop_writes_what_has_arrived_and_leaves_the_rest_for_a_rerun(
    redis: Redis, tmp_path: Path
) -> None:
    source = write_lines(tmp_path / "in.jsonl", prompts(200))
    output = tmp_path / "out.jsonl"
    worker = FakeWorker(redis)
    worker.limit = 80
    worker.start()
    summary = await run_until(
        make(redis, source, output, max_in_flight=50), lambda s: s.written >= 60
    )
    await worker.halt()
    assert summary.ended == "interrupted"
    assert summary.written + summary.missing == 200
    assert len(read_rows(output)) == summary.written
    worker.limit = None

    rest = await run_with(worker, make(redis, source, output, max_in_flight=50, **QUICK_SWEEP))

    assert rest.already_done == summary.written
    assert rest.missing == 0
    assert len(read_rows(output)) == 200
    assert len(worker.routed) == len(set(worker.routed)) == 200


async def test_redis_lost_mid_run_ends_it_with_what_has_arrived_written(
    redis: Redis, fake_server: fakeredis.FakeServer, tmp_path: Path
) -> None:
    source = write_lines(tmp_path / "in.jsonl", prompts(100))
    output = tmp_path / "out.jsonl"
    worker = FakeWorker(redis)
    worker.limit = 30
    backfill = make(redis, source, output, max_in_flight=40, reconnect_for=0.3)

    def cut_redis(summary: BackfillSummary) -> None:
        if summary.written >= 30:
            fake_server.connected = False

    backfill.on_progress = cut_redis
    worker.start()
    try:
        async with asyncio.timeout(20):
            summary = await backfill.run()
    finally:
        fake_server.connected = True
        await worker.halt()
    assert summary.ended == "redis_error"
    assert summary.error is not None
    assert summary.written == 30
    assert summary.missing == 70
    assert len(read_rows(output)) == 30


async def test_redis_down_at_the_start_raises_before_touching_anything(
    broken_redis: Redis, tmp_path: Path
) -> None:
    source = write_lines(tmp_path / "in.jsonl", prompts(2))
    with pytest.raises(RedisError):
        await make(broken_redis, source, tmp_path / "out.jsonl").run()


# --- the command --------------------------------------------------------------------------


@pytest.fixture
def fake_connect(fake_server: fakeredis.FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_connect", lambda url: fakeredis.FakeAsyncRedis(server=fake_server))


@pytest.mark.usefixtures("fake_connect")
def test_cli_without_a_terminal_prints_key_value_summary_and_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_lines(tmp_path / "in.jsonl", ["nope", '{"x": 1}'])
    output = tmp_path / "out.jsonl"
    code = cli.main(["backfill", str(source), "--output", str(output), "--batch-queue", QUEUE])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out == ""
    summary = dict(line.split("=", 1) for line in captured.err.splitlines() if "=" in line)
    assert summary["rows"] == "2"
    assert summary["invalid"] == "2"
    assert summary["missing"] == "0"
    assert summary["reason.invalid"] == "2"
    assert summary["ended"] == "complete"
    assert len(read_rows(output)) == 2


def test_cli_redis_unreachable_exits_3_with_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = fakeredis.FakeServer()
    server.connected = False
    monkeypatch.setattr(cli, "_connect", lambda url: fakeredis.FakeAsyncRedis(server=server))
    source = write_lines(tmp_path / "in.jsonl", prompts(2))
    code = cli.main(["backfill", str(source), "--output", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert code == 3
    assert len(err.strip().splitlines()) == 1
    assert "cannot reach Redis" in err


@pytest.mark.usefixtures("fake_connect")
def test_cli_refuses_a_bad_schema_file_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_lines(tmp_path / "in.jsonl", prompts(2))
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "nope"}')
    argv = ["backfill", str(source), "--output", str(tmp_path / "o.jsonl")]
    assert cli.main([*argv, "--schema", str(schema)]) == 2
    assert "invalid JSON Schema" in capsys.readouterr().err
    assert cli.main([*argv, "--schema", str(tmp_path / "missing.json")]) == 2
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.usefixtures("fake_connect")
def test_cli_sigint_stops_cleanly_with_exit_130_and_says_how_to_resume(
    tmp_path: Path, fake_server: fakeredis.FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_lines(tmp_path / "in.jsonl", prompts(30))
    output = tmp_path / "out.jsonl"
    sync = fakeredis.FakeRedis(server=fake_server)

    def interrupt_once_queued() -> None:
        deadline = time.monotonic() + 10
        while int(sync.zcard(QUEUE)) < 30 and time.monotonic() < deadline:  # type: ignore[arg-type]
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=interrupt_once_queued)
    thread.start()
    code = cli.main(["backfill", str(source), "--output", str(output), "--batch-queue", QUEUE])
    thread.join()
    err = capsys.readouterr().err
    assert code == 130, err
    assert "30 rows missing — run the same command again to resume" in err
    assert "ended=interrupted" in err
    assert output.read_bytes() == b""


# --- what the user sees -------------------------------------------------------------------


def snapshot(**fields: Any) -> BackfillSummary:
    base: dict[str, Any] = {
        "total": 5000, "written": 1200, "already_done": 0, "ok": 1150, "failed": 30,
        "invalid": 20, "enqueued": 2200, "in_flight": 1000, "missing": 3800,
        "per_model": {"m1": 1000, "m2": 150}, "per_reason": {"Timeout": 30, "invalid": 20},
        "elapsed_s": 5.0,
    }  # fmt: skip
    return BackfillSummary(**{**base, **fields})


def test_plain_progress_prints_a_parseable_line_every_few_seconds() -> None:
    now = [0.0]
    stream = io.StringIO()
    view = PlainProgress(stream, every=5.0, clock=lambda: now[0])
    with view:
        view.update(snapshot(written=0, ok=0, failed=0, invalid=0))
        now[0] = 4.0
        view.update(snapshot(written=1000))
        assert stream.getvalue() == ""
        now[0] = 5.0
        view.update(snapshot())
    line = stream.getvalue().strip()
    assert line.startswith(
        "backfill done=1200 total=5000 ok=1150 failed=30 invalid=20 rate=240.0/s"
    )
    assert " eta=16s " in line  # 3800 rows at 240/s
    view.finish(snapshot(ended="complete"))
    pairs = dict(x.split("=", 1) for x in stream.getvalue().splitlines()[1:])
    assert pairs["rows"] == "5000"
    assert pairs["skipped"] == "0"
    assert pairs["rate"] == "240.0"
    assert pairs["model.m1"] == "1000"
    assert pairs["reason.Timeout"] == "30"


def test_terminal_progress_shows_bar_counts_and_summary_table() -> None:
    console = Console(file=io.StringIO(), force_terminal=True, width=160)
    view = TerminalProgress(console)
    with view:
        view.update(snapshot())
    view.finish(snapshot(ended="interrupted"))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    for shown in ("1200/5000", "m1 1000", "Timeout 30", "skipped (already done)", "model m1"):
        assert shown in text, shown


def test_rate_meter_uses_the_recent_window() -> None:
    now = [0.0]
    meter = RateMeter(window=10.0, clock=lambda: now[0])
    assert meter.eta(10) is None
    for t, done in ((0, 0), (10, 1000), (20, 1100), (30, 1200)):
        now[0] = t
        meter.add(done)
    assert meter.rate == pytest.approx(10.0, rel=0.01)  # the slow recent pace, not 40/s
    assert meter.eta(0) == 0.0


class FillingRedis:
    """The backfill's enqueue script, refused as a full Redis refuses it (``OOM``, nothing
    written) while ``full`` and after ``calls_before_full`` calls went through."""

    def __init__(self, backfill: Backfill, *, calls_before_full: int) -> None:
        self.script = backfill._script
        self.calls_left = calls_before_full
        self.full = True
        self.refused = 0
        backfill._script = self  # type: ignore[assignment]

    async def __call__(self, **kwargs: Any) -> Any:
        if self.full and self.calls_left <= 0:
            self.refused += 1
            raise OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")
        self.calls_left -= 1
        return await self.script(**kwargs)


async def test_a_full_redis_is_waited_out_while_rows_in_flight_will_free_room(
    redis: Redis, tmp_path: Path
) -> None:
    source = write_lines(tmp_path / "in.jsonl", prompts(40))
    output = tmp_path / "out.jsonl"
    worker = FakeWorker(redis)
    worker.limit = 10  # ten answered; ten more stay in flight while Redis is full
    backfill = make(redis, source, output, max_in_flight=20, reconnect_for=0.3)
    filling = FillingRedis(backfill, calls_before_full=1)
    worker.start()
    run = asyncio.create_task(backfill.run())
    try:
        await asyncio.sleep(1.2)  # four times the patience for an unreachable Redis
        assert filling.refused > 0
        assert not run.done(), "a full Redis with rows in flight stopped the run"
        filling.full, worker.limit = False, None
        async with asyncio.timeout(20):
            summary = await run
    finally:
        await worker.halt()
    assert summary.ended == "complete", summary.error
    assert sorted(r["id"] for r in read_rows(output)) == sorted(f"r{i}" for i in range(40))
    assert len(worker.routed) == 40


async def test_a_full_redis_with_nothing_in_flight_stops_the_run_saying_so(
    redis: Redis, tmp_path: Path
) -> None:
    source = write_lines(tmp_path / "in.jsonl", prompts(5))
    output = tmp_path / "out.jsonl"
    backfill = make(redis, source, output, reconnect_for=0.3)
    FillingRedis(backfill, calls_before_full=0)
    async with asyncio.timeout(20):
        summary = await backfill.run()
    assert summary.ended == "redis_error"
    assert summary.error is not None
    assert "Redis is full" in summary.error
    assert summary.written == 0
    assert summary.missing == 5
    assert await redis.zcard(QUEUE) == 0  # refused whole: nothing queued

    worker = FakeWorker(redis)  # room again: the same command finishes the job
    summary = await run_with(worker, make(redis, source, output, **QUICK_SWEEP))
    assert summary.ended == "complete"
    assert summary.written == 5
