"""Backfill: route every row of a JSONL file through the batch queue, once, resumably.

Why it is built this way:

* **Exactly once, across kills.** A row's job id is a hash of the output file's real
  path, the row's id and its request, and its reply list is a hash of that path: a
  rerun of the same command finds its own jobs again (queued, running, or finished
  while it was away) and never queues a row a second time. The output file is the
  record of what is done: a row is written whole, fsynced, and only then is its result
  deleted from Redis; a rerun skips the ids the file already has.
* **Flat memory.** The input is streamed; only rows in flight are held; the ids
  already written or seen are hashes in one array (:class:`IdSet`), not strings.
* **Fast.** Hundreds of rows go to Redis in one script call, results come back in
  batches of hundreds per round trip, and the output is written in batches.

Nothing here prints: progress goes to the ``on_progress`` callback (see progress.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from llm_router.client.backoff import Backoff
from llm_router.client.idset import IdSet
from llm_router.client.keys import (
    DEFAULT_BATCH_QUEUE,
    JOB_PREFIX,
    PARKED_KEY,
    RESULT_PREFIX,
    result_key,
    wake_key,
)
from llm_router.client.lua import script
from llm_router.client.protocol import (
    JOB_TTL_MS,
    WAKE_TOKENS_MAX,
    RouteRequest,
    RouteResult,
    encode,
    now_ms,
    result_from_blob,
)
from llm_router.client.rows import (
    WRITE_MAX,
    BackfillError,
    Claim,
    InputLines,
    OutputFile,
    Rejected,
    RowParser,
    RowRef,
    canonical_request,
    derived_id,
    failure_reason,
    job_blob_of,
    job_id_for,
    output_row,
    reply_key_for,
    run_key,
)
from llm_router.client.server import refused_for_memory
from llm_router.client.tally import Tally

BATCH_QUEUE_ENV = "LLM_ROUTER_BATCH_QUEUE_NAME"
DEFAULT_MAX_IN_FLIGHT = 1000

_SCRIPT_ROWS = 500  # rows per enqueue script call
_LINES_PER_TURN = 5000  # lines read before the event loop gets a turn, whatever they were
_DRAIN = 500  # replies taken per LPOP once one has arrived
_MGET_CHUNK = 500
_DEL_CHUNK = 1000
_FLUSH_ROWS = 1000
_FLUSH_EVERY_S = 0.5
_PENDING_MAX = 4 * _FLUSH_ROWS  # finished rows waiting for the disk before enqueueing pauses
_BLOCK_S = 1

# Hundreds of rows per call; per row the result blob, 0 (queued or running) or 1 (queued
# now). KEYS, ARGV and returns: see the file.
_ENQUEUE_LUA = script("backfill_enqueue.lua")


def default_batch_queue() -> str:
    return os.environ.get(BATCH_QUEUE_ENV) or DEFAULT_BATCH_QUEUE


# --- counts -------------------------------------------------------------------------------

Ending = Literal["running", "complete", "interrupted", "redis_error"]


@dataclass(frozen=True, slots=True)
class BackfillSummary:
    """Where a run stands (while running) or ended (returned by :meth:`Backfill.run`)."""

    #: Rows in the input (blank lines are not rows); an estimate until the input is read.
    total: int
    #: Rows this run wrote to the output.
    written: int
    #: Rows the output already had when this run started (skipped).
    already_done: int
    #: Of the rows this run wrote: ``ok``, ``failed`` and ``invalid_request``.
    ok: int
    failed: int
    invalid: int
    #: Jobs this run queued (not counting those it found queued or finished).
    enqueued: int
    in_flight: int
    #: Rows without an output row: ``total - written - already_done``.
    missing: int
    #: ``ok`` rows by ``model_used``; rows that did not succeed by :func:`failure_reason`.
    per_model: Mapping[str, int]
    per_reason: Mapping[str, int]
    elapsed_s: float
    ended: Ending = "running"
    #: Why the run ended early, for ``redis_error``.
    error: str | None = None
    #: Of the rows in flight, those parked until their Message Batch answers (as of the
    #: last sweep).
    parked: int = 0

    @property
    def done(self) -> int:
        return self.written + self.already_done

    @property
    def rate(self) -> float:
        """Rows written per second by this run."""
        return self.written / self.elapsed_s if self.elapsed_s > 0 else 0.0


# --- Redis --------------------------------------------------------------------------------

_TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError)


class RedisLost(Exception):
    """Redis did not answer for longer than the run waits for it."""


class Outage:
    """Backoff through a Redis blip; :class:`RedisLost` once it lasts ``patience`` s."""

    def __init__(self, patience: float) -> None:
        self.patience = patience
        self._since: float | None = None
        self._backoff = Backoff(0.2, 2.0)

    def ok(self) -> None:
        self._since = None
        self._backoff.reset()

    async def failed(self, exc: BaseException, *, patient: bool = False) -> None:
        """Wait before the next try. ``patient``: the wait does not count (room will come)."""
        now = time.monotonic()
        self._since = now if patient else (self._since or now)
        if now - self._since >= self.patience:
            if refused_for_memory(exc):
                raise RedisLost(
                    "Redis is full (maxmemory reached) and nothing in flight will free room: "
                    "raise maxmemory or drain the queue, then run the backfill again to resume"
                ) from exc
            raise RedisLost(f"{type(exc).__name__}: {exc}") from exc
        await asyncio.sleep(self._backoff.next())


class Sink:
    """Finished rows on their way to disk; their results leave Redis only once they're there."""

    def __init__(self, output: OutputFile, ids: IdSet, redis: Redis, tally: Tally) -> None:
        self._output = output
        self._ids = ids
        self._redis = redis
        self._tally = tally
        # Per row: the line, its result key (None for a row found invalid here), its counts.
        self._rows: list[tuple[bytes, str | None, str, str, str | None]] = []
        self._lock = asyncio.Lock()
        self.due = asyncio.Event()  # enough rows for a flush

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, row: RowRef, result: RouteResult, job_id: str | None) -> bool:
        """Queue the row for writing; False (and nothing queued) if it was written already."""
        if not self._ids.add(row.id, IdSet.WRITTEN):
            return False
        line = encode(output_row(row, result)) + b"\n"
        key = None if job_id is None else result_key(job_id)
        self._rows.append((line, key, result.status, result.model_used, failure_reason(result)))
        if len(self._rows) >= _FLUSH_ROWS:
            self.due.set()
        return True

    async def flush(self) -> None:
        """Write and fsync what is queued, then delete those rows' results from Redis."""
        async with self._lock:
            self.due.clear()
            rows, self._rows = self._rows, []
            for start in range(0, len(rows), WRITE_MAX):
                chunk = rows[start : start + WRITE_MAX]
                await asyncio.to_thread(self._output.write_durably, b"".join(r[0] for r in chunk))
                for _, _, status, model, reason in chunk:
                    self._tally.count(status, model, reason)
                await forget(self._redis, [r[1] for r in chunk if r[1] is not None])


async def forget(redis: Redis, keys: list[str]) -> None:
    """Delete results whose rows are on disk; best effort: a result left behind only waits
    for its TTL (and a rerun looks for those of the last write)."""
    with contextlib.suppress(RedisError, OSError):
        for start in range(0, len(keys), _DEL_CHUNK):
            await redis.delete(*keys[start : start + _DEL_CHUNK])


# --- the run ------------------------------------------------------------------------------


class Backfill:
    """One backfill run: streams the input, keeps ``max_in_flight`` jobs queued, writes results.

    ``run()`` returns a :class:`BackfillSummary`; ``stop()`` (e.g. on SIGINT) ends it
    cleanly: no more enqueueing, what has arrived is written and fsynced, the rest stays
    in Redis for the next run of the same command.
    """

    def __init__(
        self,
        redis: Redis,
        input_path: str | os.PathLike[str],
        output_path: str | os.PathLike[str],
        *,
        schema: dict[str, Any] | None = None,
        chain: str | None = None,
        context: str | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        batch_queue: str | None = None,
        on_progress: Callable[[BackfillSummary], None] | None = None,
        sweep_every: float = 10.0,
        sweep_age: float = 10.0,
        reconnect_for: float = 30.0,
        expires_in: float | None = None,
        cache_ttl: int | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._redis = redis
        self._input_path = Path(input_path)
        self._output = OutputFile(output_path)
        # Rows never expire unless asked: a backfill waits for the workers however long.
        self._parser = RowParser(
            schema=schema,
            chain=chain,
            context=context,
            expires_in=expires_in,
            cache_ttl=cache_ttl,
        )
        self._deadline_ms: int | str = (
            "" if expires_in is None else max(1, round(expires_in * 1000))
        )
        self._max = max_in_flight
        self._queue = batch_queue or default_batch_queue()
        self.on_progress = on_progress
        self._sweep_every, self._sweep_age = sweep_every, sweep_age
        self._parked = 0
        self._reconnect_for = reconnect_for
        self._script = redis.register_script(_ENQUEUE_LUA)
        self._tally = Tally()
        # Job id -> a RowRef's fields as a plain tuple of atoms, which the garbage collector
        # stops tracking (it does so for exact tuples only, not for a NamedTuple).
        self._in_flight: dict[str, tuple[str, int, bytes | None, float]] = {}
        self._room = asyncio.Event()
        self._finished = asyncio.Event()
        self._stopping = False
        self._input_done = False
        self._total = self._rows = self._already_done = self._enqueued = 0
        self._started = time.monotonic()
        self._ended: Ending = "running"
        self._error: str | None = None
        self._key = ""
        self._reply_key = ""
        self._sink: Sink | None = None
        self._lines: InputLines | None = None
        self._closing = False
        self._stale: list[Claim] = []

    def stop(self) -> None:
        """Stop enqueueing and end the run once what has arrived is on disk."""
        self._stopping = True
        if self._ended == "running":
            self._ended = "interrupted"
        self._finished.set()
        self._room.set()

    def summary(self) -> BackfillSummary:
        tally = self._tally
        if self._lines is None:
            total = self._total
        elif self._lines.exhausted:
            total = self._rows
        else:
            total = max(self._total - self._lines.blank, self._rows)
        return BackfillSummary(
            total=total,
            written=tally.total,
            already_done=self._already_done,
            ok=tally.ok,
            failed=tally.failed,
            invalid=tally.invalid,
            enqueued=self._enqueued,
            in_flight=len(self._in_flight),
            parked=self._parked,
            missing=max(0, total - tally.total - self._already_done),
            per_model=dict(tally.per_model),
            per_reason=dict(tally.per_reason),
            elapsed_s=time.monotonic() - self._started,
            ended=self._ended,
            error=self._error,
        )

    async def run(self) -> BackfillSummary:
        """Route every row of the input and append its result to the output.

        Rerunning with the same files resumes: rows the output has are skipped, jobs still
        queued are waited for, results that came while no run was there are collected.
        Raises :class:`BackfillError` for unusable files, and Redis errors when Redis does
        not answer at the start; a Redis lost later ends the run with ``ended="redis_error"``.
        """
        self._started = time.monotonic()
        written = self._open_files()
        lines = self._lines
        assert lines is not None
        try:
            await self._redis.ping()  # unreachable: raise before anything is touched
            self._output.open()
            return await self._run(lines, written)
        finally:
            lines.close()

    def _open_files(self) -> IdSet:
        """Check the files, cut a half-written output line, read the ids done already."""
        if not self._input_path.is_file():
            raise BackfillError(f"{self._input_path}: no such file")
        if self._output.path.exists() and self._output.path.samefile(self._input_path):
            raise BackfillError("the output file must not be the input file")
        try:
            written = self._output.resume()
            self._total = InputLines.count(self._input_path)
            self._lines = InputLines(self._input_path)
        except OSError as exc:
            raise BackfillError(str(exc)) from None
        self._key = run_key(self._output.path)
        self._reply_key = reply_key_for(self._key)
        return written

    async def _run(self, lines: InputLines, ids: IdSet) -> BackfillSummary:
        sink = self._sink = Sink(self._output, ids, self._redis, self._tally)
        tasks = [
            asyncio.create_task(self._enqueue_all(lines, ids), name="backfill enqueue"),
            asyncio.create_task(self._collect(), name="backfill replies"),
            asyncio.create_task(self._sweep(), name="backfill sweep"),
        ]
        flusher = asyncio.create_task(self._flush_loop(), name="backfill flush")
        for task in (*tasks, flusher):
            task.add_done_callback(self._task_ended)
        try:
            await self._finished.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Nothing adds rows any more: the flusher writes what it has and ends.
            self._closing = True
            sink.due.set()
            await asyncio.gather(flusher, return_exceptions=True)
            try:
                await sink.flush()
            finally:
                self._output.close()
        for task in (*tasks, flusher):
            if not task.cancelled() and (exc := task.exception()) is not None:
                if not isinstance(exc, RedisLost | RedisError):
                    raise exc
                self._ended, self._error = "redis_error", str(exc)
        if not lines.exhausted:
            self._total = self._rows + lines.count_rest()
            self._lines = None  # the count is exact now
        if self._ended == "running" or (
            self._ended == "interrupted" and not self.summary().missing
        ):
            self._ended = "complete"  # ran to its end (or was stopped after the last row)
        summary = self.summary()
        self._progress(summary)
        return summary

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._finished.set()

    def _progress(self, summary: BackfillSummary | None = None) -> None:
        if self.on_progress is not None:
            self.on_progress(summary or self.summary())

    def _check_finished(self) -> None:
        if self._input_done and not self._in_flight:
            self._finished.set()

    # --- enqueue ---

    async def _enqueue_all(self, lines: InputLines, ids: IdSet) -> None:
        """Keep up to ``max_in_flight`` rows in flight; build the next batch while Redis
        runs the script for the last one."""
        rows = iter(lines)
        outage = Outage(self._reconnect_for)
        sink = self._sink
        assert sink is not None
        sending: asyncio.Task[None] | None = None
        try:
            while not self._stopping:
                while not self._stopping and (
                    len(self._in_flight) >= self._max or len(sink) >= _PENDING_MAX
                ):
                    self._room.clear()
                    await self._room.wait()
                if self._stopping:
                    return
                space = min(_SCRIPT_ROWS, self._max - len(self._in_flight))
                batch = self._take(rows, space, ids)
                if self._stale:
                    await self._forget_stale()
                if sending is not None:
                    await sending
                    sending = None
                if batch:
                    call = self._script_args(batch)
                    sending = asyncio.create_task(self._send(*call, outage))
                self._progress()
                if lines.exhausted:
                    break
                await asyncio.sleep(0)  # the call goes out before the next batch is built
            if sending is not None:
                await sending
                sending = None
        finally:
            if sending is not None:
                sending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sending
        self._input_done = True
        self._check_finished()

    def _take(
        self, rows: Iterator[tuple[int, bytes]], space: int, ids: IdSet
    ) -> list[tuple[RowRef, RouteRequest]]:
        """Up to ``space`` rows to enqueue; lines that are done or invalid are dealt with here."""
        assert self._sink is not None
        batch: list[tuple[RowRef, RouteRequest]] = []
        for _, (lineno, raw) in zip(range(_LINES_PER_TURN), rows, strict=False):
            self._rows += 1
            try:
                claim = self._parser.claim(lineno, raw)
            except Rejected as exc:
                self._invalid(derived_id(lineno, raw), lineno, str(exc), ids)
                continue
            key = IdSet.hash(claim.id)
            if not ids.add_hash(key, IdSet.SEEN):
                self._invalid(
                    derived_id(lineno, raw),
                    lineno,
                    f"duplicate id {claim.id!r}: an earlier line has it",
                    ids,
                )
                continue
            if ids.has_hash(key, IdSet.WRITTEN):
                self._already_done += 1
                if lineno in self._output.recent_lines:
                    self._stale.append(claim)
                continue
            metadata = claim.fields.get("metadata")
            metadata = metadata if isinstance(metadata, dict) else None
            try:
                request = self._parser.request(claim)
            except Rejected as exc:
                self._invalid(claim.id, lineno, str(exc), ids, metadata)
                continue
            batch.append((RowRef.of(claim.id, lineno, metadata), request))
            if len(batch) >= space:
                break
        return batch

    async def _forget_stale(self) -> None:
        """Results of rows on disk that a killed run had not deleted yet."""
        keys = []
        for claim in self._stale:
            with contextlib.suppress(Rejected):
                request = self._parser.request(claim)
                keys.append(result_key(job_id_for(self._key, claim.id, request)))
        self._stale.clear()
        await forget(self._redis, keys)

    def _invalid(
        self,
        row_id: str,
        lineno: int,
        error: str,
        ids: IdSet,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if ids.has(row_id, IdSet.WRITTEN):
            self._already_done += 1
            return
        assert self._sink is not None
        result = RouteResult(status="invalid_request", error=f"line {lineno}: {error}")
        self._sink.add(RowRef.of(row_id, lineno, metadata), result, None)

    def _script_args(
        self, batch: list[tuple[RowRef, RouteRequest]]
    ) -> tuple[list[str], list[bytes | str | int]]:
        """Job ids and script arguments; the rows count as in flight from here on."""
        enqueue_ms = now_ms()
        since = time.monotonic()
        ids: list[str] = []
        args: list[bytes | str | int] = [
            JOB_TTL_MS,
            enqueue_ms,
            WAKE_TOKENS_MAX,
            JOB_PREFIX,
            RESULT_PREFIX,
            self._deadline_ms,
        ]
        for ref, request in batch:
            canonical = canonical_request(request)
            job_id = job_id_for(self._key, ref.id, canonical)
            # In flight before the call: its reply may come at once.
            self._in_flight[job_id] = (ref.id, ref.line, ref.metadata_json, since)
            ids.append(job_id)
            args += (job_id, job_blob_of(canonical, enqueue_ms, self._reply_key))
        return ids, args

    async def _send(self, ids: list[str], args: list[bytes | str | int], outage: Outage) -> None:
        keys = [self._queue, wake_key(self._queue)]
        while True:
            try:
                answers = await self._script(keys=keys, args=args)
                outage.ok()
                break
            except _TRANSIENT as exc:  # safe to repeat: queued jobs are not queued again
                await outage.failed(exc)
            except ResponseError as exc:
                if not refused_for_memory(exc):
                    raise
                # The script wrote nothing. Rows in flight free room as their results
                # reach the file: wait for that.
                await outage.failed(exc, patient=len(self._in_flight) > len(ids))
        for job_id, answer in zip(ids, answers, strict=True):
            if isinstance(answer, bytes):  # it finished while we were away
                self._deliver(job_id, result_from_blob(answer))
            elif answer == 1:
                self._enqueued += 1

    # --- results ---

    def _deliver(self, job_id: str, result: RouteResult) -> None:
        entry = self._in_flight.pop(job_id, None)
        if entry is None:  # a leftover of an earlier run, or a second copy
            return
        assert self._sink is not None
        self._sink.add(RowRef._make(entry), result, job_id)
        self._room.set()
        self._check_finished()

    def _deliver_blobs(self, blobs: list[bytes]) -> None:
        for blob in blobs:
            result = result_from_blob(blob)
            if result.job_id is not None and result.job_id in self._in_flight:
                self._deliver(result.job_id, result)

    async def _collect(self) -> None:
        """The reply list: block for one result, then take what else has come in batches."""
        outage = Outage(self._reconnect_for)
        key = self._reply_key
        while True:
            try:
                item = await self._redis.blpop([key], timeout=_BLOCK_S)  # type: ignore[misc]
                if item is not None:
                    self._deliver_blobs([item[1]])
                    while more := await self._redis.lpop(key, _DRAIN):  # type: ignore[misc]
                        self._deliver_blobs(more)
                        if len(more) < _DRAIN:
                            break
                    self._progress()
                outage.ok()
            except _TRANSIENT as exc:
                await outage.failed(exc)

    async def _sweep(self) -> None:
        """The safety net: results of old jobs that no reply announced (a lost reply list)."""
        outage = Outage(self._reconnect_for)
        while True:
            await asyncio.sleep(self._sweep_every)
            cutoff = time.monotonic() - self._sweep_age
            old: list[str] = []
            for job_id, (*_, since) in self._in_flight.items():
                if since > cutoff:
                    break  # in the order they were queued
                old.append(job_id)
            try:
                for start in range(0, len(old), _MGET_CHUNK):
                    chunk = old[start : start + _MGET_CHUNK]
                    blobs = await self._redis.mget([result_key(j) for j in chunk])
                    for job_id, blob in zip(chunk, blobs, strict=True):
                        if blob is not None:
                            self._deliver(job_id, result_from_blob(blob))
                self._parked = await self._count_parked()
                outage.ok()
            except _TRANSIENT as exc:
                await outage.failed(exc)

    async def _count_parked(self) -> int:
        """How many rows in flight wait for a Message Batch (one ZMSCORE per chunk); 0
        for a producer whose ACL does not let it read the parked set."""
        ids, parked = list(self._in_flight), 0
        try:
            for start in range(0, len(ids), _MGET_CHUNK):
                scores = await self._redis.zmscore(PARKED_KEY, ids[start : start + _MGET_CHUNK])
                parked += sum(score is not None for score in scores)
        except ResponseError:  # NOPERM: the count is a nicety, the run goes on
            return 0
        return parked

    async def _flush_loop(self) -> None:
        assert self._sink is not None
        sink = self._sink
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_FLUSH_EVERY_S):
                    await sink.due.wait()
            await sink.flush()
            self._room.set()
            self._progress()
            if self._closing:
                return
