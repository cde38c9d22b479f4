"""The worker's loop: take jobs while a slot is free, run them, keep their leases, stop.

* It blocks on the queues' wake-up lists (``BLPOP <queue>:wake``), which producers
  push to when they enqueue, and offers itself in the idle set, so that a producer's
  enqueue can hand it a job at once. It polls only as a slow safety net for producers
  that write arq's keys alone; it takes no token while it has no free slot, so tokens
  reach idle workers; a queue with a backlog is claimed from again whenever a slot
  frees, so it drains at full speed. While it is idle and its polls find nothing, the
  poll slows to twice ``poll_delay``: an idle worker costs little CPU.
* It serves the interactive queue first and a batch queue with the slots interactive
  work leaves (:mod:`~llm_router.worker.lanes`).
* A job's lease (``arq:in-progress:<id>`` = this worker's token) is renewed while the
  job runs; when the worker dies it lapses within ``lease_seconds`` and another worker
  takes the job.
* On SIGTERM it stops taking jobs, lets running ones finish within the grace period
  and hands the rest back at once (SIGINT: no grace; a second signal: stop now).
* A producer's cancel reaches a running job at once (a message on the cancel
  channel) or at the next lease renewal (its marker): the job's task is cancelled, its
  model call abandoned, and it ends ``cancelled``.
* Redis errors never end it (:mod:`~llm_router.worker.outage`).

The Redis side is :mod:`~llm_router.worker.queue`; what a job is, and what its result
says, is the job runner's (:mod:`~llm_router.worker.jobs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import structlog
from redis.exceptions import RedisError

from llm_router.client.protocol import RouteResult, now_ms
from llm_router.worker.control import Control
from llm_router.worker.jobs import Finished
from llm_router.worker.lanes import Lanes
from llm_router.worker.queue import Claimed, Parking, RedisQueue, Woken

log = structlog.get_logger("llm_router.worker")

T = TypeVar("T")

#: How long one wait for a wake-up blocks before the worker offers itself again.
WAKE_BLOCK_S = 5.0
#: Results whose jobs go to the failed-job registry (``llm-router failed``).
REGISTERED = frozenset({"failed", "expired"})
#: An idle worker whose polls find nothing polls at most this many times slower.
IDLE_POLL_FACTOR = 2.0
#: While stopping, how long storing a result may wait for Redis before the lease is left
#: to lapse (another worker then runs the job again).
STOPPING_STORE_S = 10.0


class JobRunner(Protocol):
    """What runs a claimed job: :class:`~llm_router.worker.jobs.RouteJobs`."""

    async def run(self, job: Claimed, control: Control) -> Finished | Parking: ...

    def crashed(self, job: Claimed, exc: BaseException) -> Finished: ...

    def cancelled(self, job: Claimed) -> Finished: ...

    async def release_parked(self, job_id: str) -> None:
        """A cancel for a job no worker runs: one parked for a Message Batch ends now."""


class Listener(Protocol):
    """Told of every stored result and of the stop (heartbeat, Prometheus, systemd)."""

    def finished(self, result: RouteResult) -> None: ...

    def parked(self) -> None:
        """A job was parked until its Message Batch answers."""

    def stopping(self) -> None: ...


class Worker:
    """Serves the lanes of one :class:`~llm_router.worker.queue.RedisQueue`."""

    def __init__(
        self,
        queue: RedisQueue,
        jobs: JobRunner,
        *,
        poll_delay: float = 0.5,
        job_timeout: float = 300.0,
        shutdown_grace: float = 30.0,
        listeners: Sequence[Listener] = (),
    ) -> None:
        self.queue = queue
        self.jobs = jobs
        self.lanes: Lanes = queue.lanes
        self.poll_delay = poll_delay
        self.job_timeout = job_timeout
        self.shutdown_grace = shutdown_grace
        self.listeners = list(listeners)
        #: The value of this worker's leases, also its id in heartbeats and logs.
        self.token = queue.token
        self.stopping = False
        #: Set while at least one job runs (the event-loop lag monitor samples then).
        self.busy = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._controls: dict[str, Control] = {}
        self._leased: set[str] = set()
        #: Jobs whose result is being stored: still leased (the lease is renewed while a
        #: store waits for Redis), no longer to be cancelled or reported lost.
        self._storing: set[str] = set()
        self._wake = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._grace: float | None = None
        self._background: set[asyncio.Task[Any]] = set()

    @property
    def running(self) -> int:
        return len(self._tasks)

    @property
    def max_jobs(self) -> int:
        return self.lanes.interactive.max_jobs

    # -- serving ----------------------------------------------------------------------------

    async def serve(self, *, handle_signals: bool = True) -> None:
        """Take and run jobs until :meth:`stop` (or a signal), then stop gracefully."""
        if handle_signals:
            self._handle_signals()
        helpers = [
            asyncio.create_task(self._listen_for_wake_ups(), name="wake-up listener"),
            asyncio.create_task(self._renew_leases(), name="lease renewal"),
            asyncio.create_task(self._listen_for_cancels(), name="cancel listener"),
        ]
        try:
            delay = self.poll_delay
            while not self.stopping:
                self._wake.clear()
                found = await self._claim()
                # Idle and nothing found: the safety poll slows to IDLE_POLL_FACTOR times
                # poll_delay (producers that push wake-ups are served at once anyway).
                idle = not found and not self.running
                delay = (
                    min(delay * 2, self.poll_delay * IDLE_POLL_FACTOR) if idle else self.poll_delay
                )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
            await self._withdraw()  # producers stop handing jobs to this worker
            await self._wind_down()
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            if self._tasks:  # cancelled from outside: hand back what is still running
                for task in self._tasks.values():
                    task.cancel()
                await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            if self._background:
                await asyncio.wait(self._background, timeout=5)

    def stop(self, grace: float | None = None) -> None:
        """Stop taking jobs; running ones get ``grace`` seconds (default
        ``shutdown_grace``) to finish, then are handed back. Called again: stop now."""
        if self.stopping:
            self._grace = 0.0
            self._cancel_running()
            return
        self.stopping = True
        self._grace = self.shutdown_grace if grace is None else grace
        self._wake.set()
        self._slot_freed.set()
        for listener in self.listeners:
            listener.stopping()

    def cancel(self, job_id: str) -> bool:
        """Stop a job this worker runs, for its producer: it ends ``cancelled``."""
        task, control = self._tasks.get(job_id), self._controls.get(job_id)
        if task is None or control is None or task.done() or control.cancelled:
            return False
        if job_id in self._storing:  # it has its result: storing it wins
            return False
        control.cancelled = True
        task.cancel()
        log.info("job_cancelled", job_id=job_id)
        return True

    def _handle_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for signum, grace in ((signal.SIGTERM, None), (signal.SIGINT, 0.0)):
            loop.add_signal_handler(signum, self._on_signal, signum, grace)

    def _on_signal(self, signum: signal.Signals, grace: float | None) -> None:
        log.info(
            "worker_stopping",
            signal=signal.Signals(signum).name,
            running=self.running,
            grace_s=self.shutdown_grace if grace is None else grace,
        )
        self.stop(grace)

    async def _claim(self) -> int:
        """Claim what the free slots can take; the number of jobs started."""
        free = self.max_jobs - self.running
        if self.stopping or free <= 0:
            return 0
        wants = self.lanes.wants(free)
        answer = await self._through_outage("polling the queue", self.queue.claim(wants, free))
        if answer is None:
            return 0
        (claimed,) = answer
        got = [0] * len(wants)
        for job in claimed:
            got[self.lanes.queues.index(job.lane)] += 1
            self._start(job)
        self.lanes.claimed(wants, got)
        return len(claimed)

    async def _listen_for_wake_ups(self) -> None:
        """While a slot is free, wait for a job handed over at enqueue (start it at once)
        or a wake-up token (claim at once); while full or stopping, take neither."""
        while True:
            free = self.max_jobs - self.running
            if self.stopping or free <= 0:
                await self._withdraw()
                if self.stopping:
                    return
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            lanes = [lane for lane in self.lanes.queues if lane.room(free) > 0]
            waiting = self.queue.wait_for_work(lanes, WAKE_BLOCK_S)
            answer = await self._through_outage("waiting for wake-ups", waiting)
            if answer is None:
                continue
            (arrival,) = answer
            if isinstance(arrival, Claimed):
                self._take_handed_job(arrival)
                await asyncio.sleep(0)  # let the job start before this loop's next round trip
            elif isinstance(arrival, Woken):
                if self.stopping:  # the token belongs to another worker
                    await self.queue.return_token(arrival)
                else:
                    self._wake.set()

    def _take_handed_job(self, job: Claimed) -> None:
        """A producer leased this job to us in its enqueue script: run it, or hand it back
        when stopping or full (a claim may have filled the slot the producer saw free)."""
        if not self.stopping and self.running < self.max_jobs:
            self._start(job)
        else:
            self._in_background(self._hand_back(job))

    async def _withdraw(self) -> None:
        """Stop being offered jobs; hand back any that were handed over meanwhile."""
        try:
            handed = await self.queue.withdraw()
        except (RedisError, OSError):
            return  # the idle entry lapses, and so do the leases of anything handed over
        for job in handed:
            self._take_handed_job(job)

    async def _renew_leases(self) -> None:
        """Extend the lease of every running job, three times per lease."""
        while True:
            await self.busy.wait()  # an idle worker has no lease to renew: no wake-ups
            await asyncio.sleep(self.queue.lease_ms / 3000)
            if not self._leased:
                continue
            answer = await self._through_outage("renewing leases", self.queue.renew(self._leased))
            if answer is None:
                continue
            lost, cancelled = answer[0]
            for job_id in lost:
                # Not a job that finished during the renewal.
                if job_id in self._leased and job_id not in self._storing:
                    log.warning("lease_lost", job_id=job_id)
            for job_id in cancelled:  # the cancel's message may have been missed
                self.cancel(job_id)

    async def _listen_for_cancels(self) -> None:
        """Producers' cancels as they are published; the lease renewal is the net."""
        failing = False
        while True:
            try:
                async for job_id in self.queue.cancel_requests():
                    failing = False
                    if not self.cancel(job_id):  # not running here: parked, perhaps
                        self._in_background(self.jobs.release_parked(job_id))
            except (RedisError, OSError) as exc:
                if not failing:  # once a streak: an outage is logged by the other loops
                    log.warning("cancel_listener_failed", error=f"{type(exc).__name__}: {exc}")
                failing = True
            await asyncio.sleep(1.0)

    async def _through_outage(self, during: str, call: Awaitable[T]) -> tuple[T] | None:
        """``(its answer,)``; None when Redis did not answer, after the outage's backoff."""
        try:
            value = await call
        except (RedisError, OSError) as exc:
            await asyncio.sleep(self.queue.outage.failed(exc, during))
            return None
        self.queue.outage.ok()
        return (value,)

    # -- one job ----------------------------------------------------------------------------

    def _start(self, job: Claimed) -> None:
        job.lane.running += 1
        self._leased.add(job.job_id)
        self.busy.set()
        control = self._controls[job.job_id] = Control()
        task = asyncio.get_running_loop().create_task(
            self._run(job, control), name=f"job {job.job_id}"
        )
        self._tasks[job.job_id] = task
        task.add_done_callback(lambda _: self._job_done(job))

    def _job_done(self, job: Claimed) -> None:
        # While full (the worker, or this lane's share), no wake-up tokens were taken.
        lane = job.lane
        was_full = self.running >= self.max_jobs or lane.running >= lane.max_jobs
        self._tasks.pop(job.job_id, None)
        self._controls.pop(job.job_id, None)
        lane.running -= 1
        if not self._tasks:
            self.busy.clear()
        self._slot_freed.set()
        if was_full or self.lanes.backlog_waiting(self.max_jobs - self.running):
            # Look for queued jobs now: a backlog outlasts its producers' wake-up tokens.
            self._wake.set()

    async def _run(self, job: Claimed, control: Control) -> None:
        """Run one leased job to a stored result, or hand it back; never raises but for
        cancellation."""
        started_ms = now_ms()
        try:
            try:
                # asyncio.timeout, not wait_for: no extra task, so no extra turn of the loop.
                async with asyncio.timeout(self.job_timeout):
                    finished = await self.jobs.run(job, control)
            except asyncio.CancelledError:
                if control.swallow_cancel():  # its producer cancelled it: it ends so
                    finished = self.jobs.cancelled(job)
                else:
                    # Stopping and out of grace: hand the job back for another worker now.
                    if await self._hand_back(job):
                        log.info("job_handed_back", job_id=job.job_id)
                    return
            except Exception as exc:  # the runner catches its own; a bug, or the timeout
                if not isinstance(exc, TimeoutError):
                    log.exception("job_crashed", job_id=job.job_id)
                finished = self.jobs.crashed(job, exc)
            if isinstance(finished, Parking):
                await self._park(job, finished)
            else:
                await self._store(job, finished, started_ms)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job_crashed", job_id=job.job_id)
        finally:
            self._leased.discard(job.job_id)

    async def _store(self, job: Claimed, finished: Finished, started_ms: int) -> None:
        """Store the result (the first one of a job wins); then tell the listeners, and run
        what comes after the store in the background, off the producer's clock. The
        lease is renewed while the store waits for Redis (an outage, a full Redis)."""
        blob = finished.blob(job, started_ms)

        async def finish() -> bool:
            return await self.queue.finish(
                job,
                blob,
                finished.reply_to,
                announce=finished.announce,
                register=finished.result.status in REGISTERED,
            )

        if not await self._end(job, "storing a result", finish, "result_not_stored"):
            return
        for listener in self.listeners:
            listener.finished(finished.result)
        if finished.after_store is not None:
            self._in_background(finished.after_store())

    async def _park(self, job: Claimed, parking: Parking) -> None:
        """Park the job until its Message Batch answers: it frees its slot, and no worker
        holds it meanwhile. If Redis does not take it, the lease lapses and the job runs
        again (its request is then parked anew)."""

        async def park() -> bool:
            return await self.queue.park(job, parking)

        if await self._end(job, "parking a job", park, "job_not_parked"):
            for listener in self.listeners:
                listener.parked()

    async def _end(
        self, job: Claimed, during: str, write: Callable[[], Awaitable[bool]], failed: str
    ) -> bool:
        """Write how a job ended (its result, or its parking: the script releases the
        lease) through an outage; True when this run's write took. While stopping, Redis
        is not waited for for ever: the lease lapses and another worker runs the job."""
        self._storing.add(job.job_id)
        give_up = STOPPING_STORE_S if self.stopping else None
        try:
            done = await self.queue.outage.retry(during, write, give_up_after=give_up)
        except (RedisError, OSError):
            log.warning(failed, job_id=job.job_id)
            return False
        finally:
            self._leased.discard(job.job_id)
            self._storing.discard(job.job_id)
        if not done:
            log.info("duplicate_run", job_id=job.job_id)
        return done

    async def _hand_back(self, job: Claimed) -> bool:
        self._leased.discard(job.job_id)
        try:
            return await self.queue.outage.retry(
                "handing a job back",
                lambda: self.queue.hand_back(job.job_id, job.lane),
                give_up_after=STOPPING_STORE_S,
            )
        except (RedisError, OSError):
            return False  # the lease lapses on its own

    def _in_background(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- stopping ---------------------------------------------------------------------------

    async def _wind_down(self) -> None:
        """Let running jobs finish within the grace period, then hand the rest back."""
        running = list(self._tasks.values())
        if running and self._grace:
            await asyncio.wait(running, timeout=self._grace)
        self._cancel_running()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    def _cancel_running(self) -> None:
        for task in self._tasks.values():
            task.cancel()
