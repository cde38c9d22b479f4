"""The arq side: JSON (never pickle) job codec, the ``route`` job, the Worker.

The job is a thin wrapper around :class:`~llm_router.worker.router.Router`:
decode, validate, route, and always return a result object, because an
exception raised by an arq job reaches the producer only as a lost string.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import structlog
from arq.connections import RedisSettings
from arq.jobs import SerializationError
from arq.worker import Function, JobExecutionFailed, func
from pydantic import ValidationError

from llm_router.client.connections import SentinelURL, is_sentinel_url, parse_sentinel_url
from llm_router.client.protocol import (
    JOB_FUNCTION,
    RouteRequest,
    RouteResult,
    encode,
    unsupported_version,
    valid_reply_to,
)
from llm_router.client.untrusted import loads
from llm_router.worker import services
from llm_router.worker.daemon import RouterWorker
from llm_router.worker.router import Router, invalid_result
from llm_router.worker.settings import Settings

log = structlog.get_logger("llm_router.jobs")

_PICKLE_MAGIC = b"\x80"
#: A job with a schema, larger than this, is validated in the checks thread: checking a
#: schema that is not compiled yet costs about 2.6 µs of CPU a byte.
INLINE_JOB_BYTES = 2048


def serialize(data: dict[str, Any]) -> bytes:
    """arq's serializer hook; result blobs carry a protocol result, never an exception."""
    if "r" in data:
        result = data["r"]
        if isinstance(result, BaseException):
            result = exception_result(result, data.get("id")).model_dump(mode="json")
        # The request is not copied into the result: it can be large, and it is prompt text.
        data = {**data, "a": [], "k": {}, "r": result}
    return encode(data)


def deserialize(blob: bytes, max_bytes: int | None = None) -> Any:
    """arq's deserializer hook: JSON only; a pickle is refused without being loaded."""
    if max_bytes is not None and len(blob) > max_bytes:
        raise ValueError(
            f"the job is {len(blob)} bytes, more than the limit of {max_bytes} (max_request_bytes)"
        )
    if blob[:1] == _PICKLE_MAGIC:
        raise ValueError("pickle payloads are refused; jobs must be JSON")
    try:
        data = loads(blob)
    except RecursionError:
        raise ValueError("the job is nested too deeply to parse") from None
    check_job_shape(data)
    return data


def check_job_shape(data: Any) -> None:
    """arq trusts these fields; a wrong type would crash it outside its own error handling."""
    if not isinstance(data, dict):
        raise ValueError(f"a job must be a JSON object, not {type(data).__name__}")
    missing = [key for key in ("t", "f", "a", "k", "et") if key not in data]
    if missing:
        raise ValueError(f"the job has no {', '.join(repr(m) for m in missing)}")
    if not isinstance(data.get("f"), str):
        raise ValueError("'f' (the function name) must be a string")
    if not isinstance(data.get("a"), list):
        raise ValueError("'a' (the arguments) must be a list")
    if not isinstance(data.get("k"), dict):
        raise ValueError("'k' (the keyword arguments) must be an object")
    et, t = data.get("et"), data.get("t")
    if not isinstance(et, int) or isinstance(et, bool) or not 0 <= et < 2**53:
        raise ValueError("'et' (the enqueue time in ms) must be a non-negative integer")
    if t is not None and (not isinstance(t, int) or isinstance(t, bool) or not 0 <= t <= 1):
        raise ValueError("'t' (the try number) must be null, 0 or 1")


def exception_result(exc: BaseException, job_id: str | None) -> RouteResult:
    """Map what arq reports (unreadable job, unknown function, crash) to a result."""
    if isinstance(exc, SerializationError):
        cause = exc.__cause__ or exc
        return invalid_result(f"job payload is not a JSON arq job: {cause}", job_id=job_id)
    if isinstance(exc, JobExecutionFailed) and "not found" in str(exc):
        return invalid_result(f"unknown job function: {exc}", job_id=job_id)
    if isinstance(exc, JobExecutionFailed) and "retries exceeded" in str(exc):
        error = (
            f"the job was started too often without finishing ({exc}): its workers died "
            "or were killed while running it, so it is not tried again"
        )
        return RouteResult(status="failed", error=error, job_id=job_id)
    return RouteResult(status="failed", error=f"{type(exc).__name__}: {exc}", job_id=job_id)


def _payload(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if len(args) == 1 and not kwargs:
        return args[0]
    if not args and set(kwargs) == {"request"}:
        return kwargs["request"]
    return None


class UnsupportedVersion(ValueError):
    """The request is of a protocol version this worker does not speak; its message is
    the whole error, as producers may match on it."""


def parse_request(
    args: tuple[Any, ...], kwargs: dict[str, Any], settings: Settings
) -> RouteRequest:
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


def register_reply(ctx: dict[str, Any], job_id: str, kwargs: dict[str, Any]) -> None:
    """Note where the producer waits, for the script that stores the result."""
    reply_to = valid_reply_to(kwargs.pop("reply_to", None))
    if reply_to is not None:
        ctx.setdefault("replies", {})[job_id] = reply_to


async def route(ctx: dict[str, Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """The arq job: decode, route, and return the result as a JSON object."""
    job_id: str = ctx["job_id"]
    router: Router = ctx["router"]
    register_reply(ctx, job_id, kwargs)
    try:
        payload = _payload(args, kwargs)
        has_schema = isinstance(payload, dict) and payload.get("schema") is not None
        if has_schema and ctx.get("job_bytes", 0) > INLINE_JOB_BYTES:
            request = await router.offload.run(parse_request, args, kwargs, router.settings)
        else:
            request = parse_request(args, kwargs, router.settings)
    except (ValidationError, ValueError) as exc:
        if isinstance(exc, ValidationError):
            error = _validation_message(exc)
        else:
            error = str(exc) if isinstance(exc, UnsupportedVersion) else f"invalid request: {exc}"
        result = invalid_result(error, job_id=job_id)
        log.warning("invalid_request", job_id=job_id, error=result.error)
    else:
        result = await router.run(
            request, job_id=job_id, record=False, lane=ctx.get("lane", "interactive")
        )
    for observe in ctx.get("observers", ()):
        observe(result)
    # Counted and announced once the result is stored, off the producer's clock.
    breakers = router.breaker_states(result.chain)
    ctx.setdefault("after_finish", {})[job_id] = functools.partial(
        router.metrics.record, result, breakers
    )
    return result.model_dump(mode="json")


@dataclasses.dataclass(repr=False)
class SentinelRedisSettings(RedisSettings):
    """arq's settings for a Sentinel URL, with the parsed URL for ``RouterWorker._connect``
    (arq's own Sentinel pool takes no sentinel password, TLS options or timeouts)."""

    sentinel_url: SentinelURL | None = None

    def __repr__(self) -> str:  # arq's would show the password
        return f"SentinelRedisSettings({self.sentinel_url!r})"


def redis_settings(url: str) -> RedisSettings:
    """arq's DSN parser plus what it misses: percent-encoded credentials, TLS options,
    Sentinel URLs (``redis+sentinel://``, parsed by :mod:`llm_router.client.connections`)."""
    if is_sentinel_url(url):
        info = parse_sentinel_url(url)
        return SentinelRedisSettings(
            host=list(info.sentinels),
            sentinel=True,
            sentinel_master=info.master,
            database=info.db,
            username=info.username,
            password=info.password,
            ssl=info.ssl,
            ssl_cert_reqs=info.ssl_cert_reqs or "required",
            ssl_ca_certs=info.ssl_ca_certs,
            ssl_certfile=info.ssl_certfile,
            ssl_keyfile=info.ssl_keyfile,
            ssl_check_hostname=bool(info.ssl_check_hostname),
            conn_timeout=5,
            sentinel_url=info,
        )
    settings = RedisSettings.from_dsn(url)
    if settings.username:
        settings.username = unquote(settings.username)
    if settings.password:
        settings.password = unquote(settings.password)
    query = {k: v[-1] for k, v in parse_qs(urlparse(url).query).items()}
    if "ssl_cert_reqs" in query:
        settings.ssl_cert_reqs = query["ssl_cert_reqs"]
    if "ssl_ca_certs" in query:
        settings.ssl_ca_certs = query["ssl_ca_certs"]
    if "ssl_certfile" in query:
        settings.ssl_certfile = query["ssl_certfile"]
    if "ssl_keyfile" in query:
        settings.ssl_keyfile = query["ssl_keyfile"]
    if "ssl_check_hostname" in query:
        settings.ssl_check_hostname = query["ssl_check_hostname"].lower() in {"1", "true", "yes"}
    settings.conn_timeout = 5
    return settings


def route_function(settings: Settings) -> Function:
    return func(route, name=JOB_FUNCTION, timeout=settings.job_timeout)


def worker_settings(settings: Settings) -> dict[str, Any]:
    """The keyword arguments of :class:`arq.worker.Worker` for these settings."""
    return {
        "functions": [route_function(settings)],
        "redis_settings": redis_settings(settings.redis_url.get_secret_value()),
        "queue_name": settings.queue_name,
        "max_jobs": settings.max_jobs,
        "job_timeout": settings.job_timeout,
        "keep_result": settings.keep_result,
        "poll_delay": settings.poll_delay,
        "job_serializer": serialize,
        "job_deserializer": functools.partial(deserialize, max_bytes=settings.max_request_bytes),
        "max_tries": settings.max_tries,
        "job_completion_wait": settings.shutdown_grace,
        "lease_seconds": settings.lease_seconds,
        "batch_queue": settings.batch_queue_name,
        "batch_max_jobs": settings.batch_slots,
        "batch_keep_result": settings.batch_keep_result,
        "on_startup": services.start,
        "on_shutdown": services.stop,
        "ctx": {"settings": settings},
        "log_results": False,
        "allow_abort_jobs": False,
    }


def create_worker(settings: Settings, **overrides: Any) -> RouterWorker:
    return RouterWorker(**{**worker_settings(settings), **overrides})
