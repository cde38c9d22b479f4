"""The wire protocol between producers and workers: JSON only, never pickle.

A job is an arq job whose blob is JSON, so that any language can enqueue one:

* ``SET arq:job:<id> <job blob> PX <ttl>`` and ``ZADD <queue> <enqueue ms> <id>``
  (in one MULTI), where the job blob is
  ``{"t": 1, "f": "route", "a": [<request>], "k": {...}, "et": <enqueue ms>}``.
* Optionally ``LPUSH <queue>:wake 1`` (then ``LTRIM <queue>:wake 0 99``): a
  waiting worker starts the job at once instead of at its next safety poll.
* The worker stores ``arq:result:<id>`` as the JSON result blob
  ``{"t", "f", "a": [], "k": {}, "et", "s", "r": <result>, "st", "ft", "q", "id"}``;
  ``r`` is a :class:`RouteResult` whatever happened, including a request the
  worker could not read.
* With ``"k": {"reply_to": "llm_router:reply:<anything>"}`` the worker also
  ``LPUSH``-es that same result blob to that list (TTL :data:`REPLY_TTL_S`) in
  the transaction that stores it, so a producer can ``BLPOP`` instead of polling.

Both sides validate the request with :class:`RouteRequest`, so a foreign
producer's mistake comes back as an ``invalid_request`` result, not a lost job.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from llm_router.client.keys import REPLY_PREFIX
from llm_router.client.schemas import CEILING, SchemaLimits, compile_schema
from llm_router.client.untrusted import problem

#: The newest version this release speaks (results carry it); version 2 added the
#: request's ``expires_in`` and the statuses ``expired`` and ``cancelled``; version 3 the
#: request's ``cache_ttl`` (results' ``cached`` and attempts' ``batch_id`` are additions
#: a reader of any version may ignore).
PROTOCOL_VERSION = 3
#: Request versions this release understands; a request without ``v`` is version 1.
SUPPORTED_VERSIONS = (1, 2, 3)
#: The longest deadline a request may ask for: a queued job's key lives a day anyway.
MAX_EXPIRES_IN_S = 86_400.0
#: The longest a cached answer may be kept (30 days).
MAX_CACHE_TTL_S = 2_592_000

JOB_FUNCTION = "route"
DEFAULT_CHAIN = "default"
#: The chain a batch-queue job without ``chain`` uses when the worker has one so named.
BATCH_CHAIN = "batch"

#: How long an unclaimed job stays in Redis before it expires (arq's default).
JOB_TTL_MS = 86_400_000
#: A reply list nobody reads disappears after this long.
REPLY_TTL_S = 600
#: At most this many wake-up tokens wait in a queue's wake-up list.
WAKE_TOKENS_MAX = 100
#: How long arq keeps a job's try counter (``arq:retry:<id>``), in seconds.
RETRY_KEY_TTL_S = 88_400
#: Deepest nesting of arrays and objects anywhere in a request (its schema has its own,
#: lower limit): results echo ``metadata``, and pydantic serializes at most ~255 levels.
MAX_REQUEST_DEPTH = 100

Status = Literal["ok", "failed", "invalid_request", "expired", "cancelled"]
Outcome = Literal["success", "rejected", "invalid", "skipped"]


class Message(BaseModel):
    """One OpenAI-style chat message; extra keys (``name``, ...) pass through."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]]


def unsupported_version(request: Any) -> str | None:
    """Why this worker cannot read the request's version, or None."""
    if not isinstance(request, dict) or "v" not in request:
        return None
    v = request["v"]
    if isinstance(v, int) and not isinstance(v, bool) and v in SUPPORTED_VERSIONS:
        return None
    supported = ", ".join(map(str, SUPPORTED_VERSIONS))
    return f"unsupported protocol version {json.dumps(v)[:40]} (supported: {supported})"


class RouteRequest(BaseModel):
    """What a producer asks for: messages, an optional JSON Schema and labels."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    v: int = Field(default=1, description="protocol version; absent means 1")
    messages: list[Message] = Field(min_length=1)
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    context: str | None = Field(default=None, max_length=200)
    #: Absent: the worker's ``default`` chain (on the batch queue, ``batch`` if it has one).
    chain: str | None = Field(default=None, min_length=1, max_length=100)
    metadata: dict[str, Any] = Field(default_factory=dict)
    #: Version 2: seconds from enqueue, on Redis' clock, after which the job is not
    #: started (and a running one starts no further model): the result is ``expired``.
    expires_in: float | None = Field(default=None, gt=0, le=MAX_EXPIRES_IN_S)
    #: Version 3: answer from the response cache when the same request (chain, messages,
    #: schema) was answered ``ok`` within this many seconds, and keep this answer as long;
    #: 0 turns off the chain's default. Absent: the chain's default (``cache_ttl``).
    cache_ttl: int | None = Field(default=None, ge=0, le=MAX_CACHE_TTL_S)

    @model_validator(mode="before")
    @classmethod
    def _safe_to_carry(cls, data: Any) -> Any:
        if (why := problem(data, MAX_REQUEST_DEPTH)) is not None:
            raise ValueError(f"the request {why}")
        if (unsupported := unsupported_version(data)) is not None:
            raise ValueError(unsupported)  # first: a newer request's fields mean nothing here
        return data

    @model_validator(mode="after")
    def _version_has_the_fields(self) -> RouteRequest:
        if self.expires_in is not None and self.v < 2:
            raise ValueError('expires_in needs protocol version 2: send "v": 2')
        if self.cache_ttl is not None and self.v < 3:
            raise ValueError('cache_ttl needs protocol version 3: send "v": 3')
        return self

    @field_validator("json_schema")
    @classmethod
    def _schema_is_usable(
        cls, value: dict[str, Any] | None, info: ValidationInfo
    ) -> dict[str, Any] | None:
        """Checked with the worker's limits when it passes them as ``context``
        (:class:`SchemaLimits`), else with the ceilings any worker could accept."""
        if value is not None:
            limits = info.context if isinstance(info.context, SchemaLimits) else CEILING
            compile_schema(value, limits)
        return value

    def wire(self) -> dict[str, Any]:
        """The request as it travels: aliases, no unset optionals, and no ``v`` for
        version 1 (absent means 1), which workers older than ``v`` also read. A request
        without a version 2 field is sent as version 1."""
        wire = self.model_dump(by_alias=True, exclude_none=True, mode="json")
        if wire.get("v") == 1:
            del wire["v"]
        return wire


class Attempt(BaseModel):
    """One model tried for one request (``skipped``: not called, busy or circuit open)."""

    model: str
    outcome: Outcome
    reason: str | None = None
    latency_ms: int
    #: A local model's load time in this call (Ollama's ``load_duration``), when known.
    load_ms: int | None = None
    #: Tries of the same model after a transient failure (429, 529, 5xx, a reset).
    retries: int = 0
    #: The error the last retry answered (the attempt's own ``reason`` is its outcome's).
    retry_error: str | None = None
    #: Tokens of the call that answered (None: no answer); input excludes the cached part.
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    #: From litellm's bundled price map; local models and unknown prices: 0.
    cost_usd: float = 0.0
    #: How the model's answer ended (``stop``, ``length``: cut off at its token limit,
    #: ``content_filter``: the provider refused, ``tool_calls``); None: no answer.
    finish_reason: str | None = None
    #: The server called, when the model has an ``api_base`` or ``deployments``: its
    #: scheme, host, port and path, never credentials. None: no server was called.
    deployment: str | None = None
    #: The Message Batch that answered this attempt (the batch lane's ``batch_api``
    #: models, at the batch price); None: a real-time call.
    batch_id: str | None = None


class RouteResult(BaseModel):
    """The answer to one request, also when every model failed."""

    model_config = ConfigDict(extra="ignore")

    v: int = PROTOCOL_VERSION
    status: Status
    content: Any = None
    raw_text: str = ""
    model_used: str = "none"
    attempts: list[Attempt] = Field(default_factory=list)
    latency_ms: int = 0
    #: The same time, unrounded (for measuring what the queue adds around the chain).
    chain_ms: float = 0.0
    error: str | None = None
    job_id: str | None = None
    context: str | None = None
    chain: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    #: What every attempt of this job cost, in USD.
    cost_usd: float = 0.0
    #: Answered from the response cache: no model was called, nothing cost anything; the
    #: content and model are those of the answer that was kept, and there are no attempts.
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def now_ms() -> int:
    return int(time.time() * 1000)


def encode(value: Any) -> bytes:
    """Compact UTF-8 JSON, the only encoding on the wire.

    A lone surrogate (legal in JSON, not in UTF-8) is written as its ``\\uXXXX``
    escape, which is what it was in the JSON it came from.
    """
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8", "backslashreplace")


def decode(blob: bytes | str) -> Any:
    return json.loads(blob)


def expires_ms(expires_in: float | None) -> int | str:
    """The enqueue scripts' deadline argument: ms (at least 1), or '' for none."""
    return "" if expires_in is None else max(1, round(expires_in * 1000))


def job_blob(request: RouteRequest, enqueue_ms: int, reply_to: str | None = None) -> bytes:
    kwargs = {} if reply_to is None else {"reply_to": reply_to}
    return encode({"t": 1, "f": JOB_FUNCTION, "a": [request.wire()], "k": kwargs, "et": enqueue_ms})


def valid_reply_to(value: Any) -> str | None:
    """Only lists under our prefix: a job must not make the worker push elsewhere."""
    if isinstance(value, str) and value.startswith(REPLY_PREFIX) and len(value) <= 200:
        return value
    return None


def result_from_blob(blob: bytes | str) -> RouteResult:
    """Read an arq result blob; a non-protocol payload becomes a ``failed`` result."""
    try:
        data = decode(blob)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return RouteResult(status="failed", error="the result is not JSON (a pickling worker?)")
    inner = data.get("r") if isinstance(data, dict) else None
    job_id = data.get("id") if isinstance(data, dict) else None
    if isinstance(inner, dict) and "status" in inner:
        try:
            result = RouteResult.model_validate(inner)
            result.job_id = result.job_id or job_id
            return result
        except ValidationError as exc:
            error = f"the worker's result does not fit protocol v{PROTOCOL_VERSION}: {exc}"
            return RouteResult(status="failed", error=error[:500], job_id=job_id)
    return RouteResult(
        status="failed",
        error=f"worker returned a non-protocol result: {str(inner)[:200]}",
        job_id=job_id,
    )
