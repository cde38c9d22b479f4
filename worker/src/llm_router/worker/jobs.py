"""The route job: decode an arq job blob (JSON, never pickle), validate the request,
walk the chain, and say what to store.

Whatever happens, a job ends with a result object for the producer: a blob that is
not a JSON arq job, an unknown function, a job started too often (its workers died
running it), a request the worker refuses and a job that overran its time all get
one. What to store and what to run once it is stored is returned as a
:class:`Finished`; the loop (:mod:`llm_router.worker.loop`) stores it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from pydantic import ValidationError
from redis.exceptions import RedisError

from llm_router.client.protocol import (
    JOB_FUNCTION,
    RouteRequest,
    RouteResult,
    encode,
    now_ms,
    unsupported_version,
    valid_reply_to,
)
from llm_router.client.untrusted import loads
from llm_router.worker.control import Control
from llm_router.worker.parked import PARK_KEEP_MS, ParkedJob, ParkOrder
from llm_router.worker.queue import Claimed, Parking
from llm_router.worker.router import (
    CANCELLED_BEFORE,
    EXPIRED_BEFORE,
    Router,
    invalid_result,
    stopped_result,
)
from llm_router.worker.settings import Settings

log = structlog.get_logger("llm_router.jobs")

_PICKLE_MAGIC = b"\x80"
#: A job with a schema, larger than this, is validated in the checks thread: checking a
#: schema that is not compiled yet costs about 2.6 µs of CPU a byte.
INLINE_JOB_BYTES = 2048
#: The error of a job whose id was queued but whose blob had expired or been deleted
#: (a stable beginning producers may match on: docs/protocol.md).
EXPIRED = "JobExecutionFailed: job expired"


class UnreadableJob(ValueError):
    """The blob is not a JSON arq job; the message says why."""


@dataclass(frozen=True, slots=True)
class Finished:
    """A job's end: the result to store, the reply list to push it to, and what to do
    once it is stored (count and announce it: ``after_store``).

    ``success`` is arq's ``s``: the job function returned (a routed job, even one no
    model answered); False for a job that could not run or overran its time.
    ``announce``: the job is counted in the metrics and announced, exactly once.
    """

    result: RouteResult
    success: bool
    reply_to: str | None = None
    function: str = ""
    enqueued_ms: int = 0
    announce: bool = False
    after_store: Callable[[], Awaitable[object]] | None = None

    def blob(self, job: Claimed, started_ms: int) -> bytes:
        """arq's result blob (the request is not copied back: ``a`` and ``k`` empty)."""
        return encode(
            {"t": job.tries if self.success else 0, "f": self.function, "a": [], "k": {},
             "et": self.enqueued_ms, "s": self.success, "r": self.result.model_dump(mode="json"),
             "st": started_ms, "ft": now_ms(), "q": job.lane.name, "id": job.job_id}
        )  # fmt: skip


def decode_job(blob: bytes, max_bytes: int | None = None) -> dict[str, Any]:
    """The job blob as a dict, checked: JSON only (a pickle is refused unread), at most
    ``max_bytes``, and the fields arq's data model has, of the right types."""
    if max_bytes is not None and len(blob) > max_bytes:
        raise UnreadableJob(
            f"the job is {len(blob)} bytes, more than the limit of {max_bytes} (max_request_bytes)"
        )
    if blob[:1] == _PICKLE_MAGIC:
        raise UnreadableJob("pickle payloads are refused; jobs must be JSON")
    try:
        data = loads(blob)
    except RecursionError:
        raise UnreadableJob("the job is nested too deeply to parse") from None
    except ValueError as exc:
        raise UnreadableJob(str(exc)) from None
    check_job_shape(data)
    return data  # type: ignore[no-any-return]


def check_job_shape(data: Any) -> None:
    if not isinstance(data, dict):
        raise UnreadableJob(f"a job must be a JSON object, not {type(data).__name__}")
    missing = [key for key in ("t", "f", "a", "k", "et") if key not in data]
    if missing:
        raise UnreadableJob(f"the job has no {', '.join(repr(m) for m in missing)}")
    if not isinstance(data.get("f"), str):
        raise UnreadableJob("'f' (the function name) must be a string")
    if not isinstance(data.get("a"), list):
        raise UnreadableJob("'a' (the arguments) must be a list")
    if not isinstance(data.get("k"), dict):
        raise UnreadableJob("'k' (the keyword arguments) must be an object")
    et, t = data.get("et"), data.get("t")
    if not isinstance(et, int) or isinstance(et, bool) or not 0 <= et < 2**53:
        raise UnreadableJob("'et' (the enqueue time in ms) must be a non-negative integer")
    if t is not None and (not isinstance(t, int) or isinstance(t, bool) or not 0 <= t <= 1):
        raise UnreadableJob("'t' (the try number) must be null, 0 or 1")


def reply_to_of(blob: bytes | None) -> str | None:
    """The reply list a raw job blob names, if the blob can be read at all."""
    try:
        data = loads(blob or b"null")
        return valid_reply_to(data["k"].get("reply_to"))
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return None


def _payload(args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    if len(args) == 1 and not kwargs:
        return args[0]
    if not args and set(kwargs) == {"request"}:
        return kwargs["request"]
    return None


class UnsupportedVersion(ValueError):
    """The request is of a protocol version this worker does not speak; its message is
    the whole error, as producers may match on it."""


def parse_request(args: Sequence[Any], kwargs: dict[str, Any], settings: Settings) -> RouteRequest:
    """Accept ``a=[request]`` (the documented form) or ``k={"request": request}``;
    validate it with this worker's limits."""
    payload = _payload(args, kwargs)
    if payload is None:
        raise ValueError("a route job takes exactly one argument: the request object")
    if not isinstance(payload, dict):
        raise ValueError(f"the request must be a JSON object, not {type(payload).__name__}")
    if (unsupported := unsupported_version(payload)) is not None:
        raise UnsupportedVersion(unsupported)
    messages = payload.get("messages")
    if isinstance(messages, list) and len(messages) > settings.max_messages:
        raise ValueError(
            f"{len(messages)} messages, more than the limit of "
            f"{settings.max_messages} (max_messages)"
        )
    return RouteRequest.model_validate(payload, context=settings.schema_limits)


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "request"
        parts.append(f"{where}: {err['msg']}")
    return "invalid request: " + "; ".join(parts)


def _cannot_run(result: RouteResult, job: Claimed) -> Finished:
    """A job that never reached the router: its result, pushed where its blob says."""
    log.warning("job_failed_to_start", job_id=job.job_id, error=(result.error or "")[:200])
    return Finished(result, False, reply_to_of(job.blob))


def _unable(reason: str, job: Claimed) -> Finished:
    return _cannot_run(invalid_result(reason, job_id=job.job_id), job)


class RouteJobs:
    """Runs claimed jobs through the router; what the loop calls for each job."""

    def __init__(self, router: Router, settings: Settings) -> None:
        self.router = router
        self.settings = settings

    async def run(self, job: Claimed, control: Control | None = None) -> Finished | Parking:
        """The job's end, whatever the job holds, or the job to park until its Message
        Batch answers; raises only if cancelled."""
        control = control or Control()
        if job.blob is None:
            return _cannot_run(RouteResult(status="failed", error=EXPIRED, job_id=job.job_id), job)
        try:
            data = decode_job(job.blob, self.settings.max_request_bytes)
        except UnreadableJob as exc:
            return _unable(f"job payload is not a JSON arq job: {exc}", job)
        if data["f"] != JOB_FUNCTION:
            return _unable(f"unknown job function: function {data['f']!r} not found", job)
        if job.tries > self.settings.max_tries:
            error = (
                f"the job was started too often without finishing (max {self.settings.max_tries}"
                " retries exceeded): its workers died or were killed while running it, so it "
                "is not tried again"
            )
            return _cannot_run(RouteResult(status="failed", error=error, job_id=job.job_id), job)
        kwargs = dict(data["k"])
        reply_to = valid_reply_to(kwargs.pop("reply_to", None))
        parked: ParkedJob | None = None
        if self.router.batches is not None and job.parked:
            parked = await self.router.batches.parked(job.job_id)
            if parked is not None and parked.result is None and not parked.stopped:
                # Still waiting for its batch: leave it so.
                return Parking(parked.model, parked.custom_id, None, None, PARK_KEEP_MS)
        result = await self.route(job, data["a"], kwargs, control, parked)
        if isinstance(result, ParkOrder):
            left = control.left_s()
            deadline = None if left is None else now_ms() + round(left * 1000)
            return Parking(result.model, result.custom_id, result.state(),
                           result.entry(job.job_id), PARK_KEEP_MS, deadline)  # fmt: skip
        # Counted and announced once the result is stored, off the producer's clock.
        breakers = self.router.breaker_states(result.chain)

        async def record() -> object:
            return await self.router.metrics.record(result, breakers)

        return Finished(
            result,
            True,
            reply_to,
            function=data["f"],
            enqueued_ms=data["et"],
            announce=True,
            after_store=record,
        )

    async def route(
        self,
        job: Claimed,
        args: list[Any],
        kwargs: dict[str, Any],
        control: Control,
        parked: ParkedJob | None = None,
    ) -> RouteResult | ParkOrder:
        """Validate and route one request; a request the worker refuses is a result too,
        and so is one cancelled, or past its deadline, before a model was called. A
        ``parked`` job goes on from its batch's answer."""
        router = self.router
        try:
            payload = _payload(args, kwargs)
            has_schema = isinstance(payload, dict) and payload.get("schema") is not None
            if has_schema and len(job.blob or b"") > INLINE_JOB_BYTES:
                request = await router.offload.run(parse_request, args, kwargs, self.settings)
            else:
                request = parse_request(args, kwargs, self.settings)
        except (ValidationError, ValueError) as exc:
            if isinstance(exc, ValidationError):
                error = _validation_message(exc)
            else:
                error = (
                    str(exc) if isinstance(exc, UnsupportedVersion) else f"invalid request: {exc}"
                )
            log.warning("invalid_request", job_id=job.job_id, error=error)
            return invalid_result(error, job_id=job.job_id)
        if job.cancelled:
            if parked is not None:  # its batch answered, and was paid
                await router.settle_parked(parked)
            return stopped_result("cancelled", CANCELLED_BEFORE, request, job.job_id)
        if request.expires_in is not None:
            left_ms = request.expires_in * 1000 if job.handed else job.deadline_ms
            if left_ms is None or left_ms <= 0:
                if parked is not None:
                    await router.settle_parked(parked)
                return stopped_result("expired", EXPIRED_BEFORE, request, job.job_id)
            control.expire_in(left_ms / 1000)
        return await router.run_job(
            request,
            job_id=job.job_id,
            record=False,
            lane=job.lane.kind,
            control=control,
            resume=parked,
        )

    async def release_parked(self, job_id: str) -> None:
        """A producer cancelled a job no worker runs: if it is parked, it stops waiting
        for its batch and ends ``cancelled`` now."""
        if self.router.batches is None:
            return
        # Redis away: its batch's answer brings it back, and it ends cancelled then.
        with contextlib.suppress(RedisError, OSError):
            await self.router.batches.release(job_id)

    def cancelled(self, job: Claimed) -> Finished:
        """Cancelled before the router had the job (it has its own result for that)."""
        result = RouteResult(status="cancelled", error=CANCELLED_BEFORE, job_id=job.job_id)
        return Finished(result, True, reply_to_of(job.blob), function=JOB_FUNCTION, announce=True)

    def crashed(self, job: Claimed, exc: BaseException) -> Finished:
        """A job that overran ``job_timeout`` or hit a bug: a failed result all the same."""
        result = RouteResult(
            status="failed", error=f"{type(exc).__name__}: {exc}"[:500], job_id=job.job_id
        )
        return Finished(result, False, reply_to_of(job.blob))
