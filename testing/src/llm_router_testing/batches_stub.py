"""Anthropic's Message Batches API (``/v1/messages/batches``) for the stub server.

A batch trades latency for half the price, so code that sends one must cope with what only a
batch does: an answer that comes minutes later through a second URL, rows in any order,
requests that end ``errored``, ``canceled`` or ``expired`` while the batch as a whole
succeeds. The shapes are anthropic-sdk-python's (``types/messages/``), the behaviour the
service's documented one; what a row answers is the stub's real-time ``/v1/messages``
route's answer for the same params, so a test can swap one path for the other.

Time is compressed, not simulated: a batch's requests finish one after another over
``batch_seconds``; the 24 hours before expiry pass at once for batches created while
``expire_batches`` is set. State is read off the clock whenever it is looked at (no timers),
and each row's result is computed once, when the batch is first seen ended, then kept.
Validation splits as the service's does: the batch's shape (``custom_id``, the required
params) is refused at creation with HTTP 400; whatever the real-time route would refuse
comes back later as an ``errored`` row.

Independent of :mod:`~llm_router_testing.stubs` (which mounts it), so that running
``stubs.py`` as a script does not load two copies of it.
"""

from __future__ import annotations

import json
import random
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from aiohttp import web

#: The service's limits (its batch-processing guide): requests per batch and body bytes.
MAX_REQUESTS = 100_000
MAX_BYTES = 256 * 1024 * 1024
CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
#: A batch is processed within 24 hours or its unprocessed requests expire.
LIFETIME_S = 24 * 3600.0
#: How long ``canceling`` lasts before the batch ends: "shortly", as the service does it.
CANCELING_S = 0.1
_BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_PREFIX = "/v1/messages/batches"


def rid(prefix: str) -> str:
    """An id as Anthropic's (and the stubs') look: a prefix and 22 base58 characters."""
    return prefix + "".join(secrets.choice(_BASE58) for _ in range(22))


def stamp(seconds: float) -> str:
    """RFC 3339 in UTC with microseconds, as the service writes its timestamps."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Plan:
    """What the host decided for one request when its batch was created."""

    model: str
    #: The host's name for how it answers (the stub's ``Behaviour``), and the directive key.
    behaviour: str | None
    key: str | None
    #: Extra processing time; None: the request never finishes (only cancel or expiry end it).
    extra_s: float | None = 0.0


class BatchHost(Protocol):
    """What the batch routes need from the server that mounts them."""

    batch_seconds: float
    expire_batches: bool
    batch_max_bytes: int

    @property
    def url(self) -> str: ...

    def batch_rejection(self, request: web.Request) -> web.Response | None:
        """The real-time route's refusal of these headers (auth, version), if any."""

    def batch_error(self, status: int, kind: str, message: str) -> web.Response:
        """An error response in Anthropic's format."""

    def batch_plan(self, params: dict[str, Any]) -> Plan:
        """Decide at creation how a request will be answered."""

    def batch_result(self, params: dict[str, Any], plan: Plan) -> dict[str, Any]:
        """A processed request's ``succeeded`` or ``errored`` result."""


@dataclass(frozen=True)
class BatchCall:
    """One HTTP call to a batch route; header names lower-cased."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass(frozen=True)
class RecordedBatch:
    """A batch as the stub holds it: what was asked and, once ended, what each row got."""

    id: str
    processing_status: str
    custom_ids: tuple[str, ...]
    models: tuple[str, ...]
    behaviours: tuple[str | None, ...]
    #: The create call's headers, lower-cased.
    headers: dict[str, str]
    #: By custom_id, each row's ``result`` object; empty until the batch has ended.
    results: dict[str, dict[str, Any]]
    cancel_initiated: bool
    deleted: bool


@dataclass
class _Entry:
    custom_id: str
    params: dict[str, Any]
    plan: Plan
    done_at: float | None


@dataclass
class _Batch:
    id: str
    created: float
    entries: list[_Entry]
    headers: dict[str, str]
    #: Seconds until unprocessed requests expire: 24 hours, or ``batch_seconds`` for a batch
    #: created while ``expire_batches`` was set (its ``expires_at`` still says 24 hours).
    lifetime_s: float
    cancel_at: float | None = None
    ended: float | None = None
    #: custom_id -> result, in the (shuffled) order the results file lists them.
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    deleted: bool = False

    def end_time(self) -> float:
        """When processing ends, as things stand."""
        ends = [self.created + self.lifetime_s]
        done = [e.done_at for e in self.entries]
        if not any(d is None for d in done):
            ends.append(max(d for d in done if d is not None))
        if self.cancel_at is not None:
            ends.append(self.cancel_at + CANCELING_S)
        return min(ends)


def _error_path(path: str, message: str) -> str:
    return f"{path}: {message}"


def _validate(body: Any, max_requests: int) -> str | None:
    """The first problem with the batch's shape, worded as the service's pydantic words it."""
    if not isinstance(body, dict):
        return "request body must be a JSON object"
    if "requests" not in body:
        return _error_path("requests", "Field required")
    requests = body["requests"]
    if not isinstance(requests, list):
        return _error_path("requests", "Input should be a valid list")
    if not requests:
        return _error_path("requests", "List should have at least 1 item after validation, not 0")
    if len(requests) > max_requests:
        return _error_path(
            "requests",
            f"List should have at most {max_requests} items after validation, not {len(requests)}",
        )
    seen: set[str] = set()
    for i, item in enumerate(requests):
        where = f"requests.{i}"
        if not isinstance(item, dict):
            return _error_path(where, "Input should be a valid dictionary")
        if (problem := _custom_id_problem(item.get("custom_id"), "custom_id" in item)) is not None:
            return _error_path(f"{where}.custom_id", problem)
        custom_id = str(item["custom_id"])
        if custom_id in seen:
            return _error_path(
                f"{where}.custom_id",
                f"custom_id {custom_id!r} is not unique; each request in a batch needs its own",
            )
        seen.add(custom_id)
        if "params" not in item:
            return _error_path(f"{where}.params", "Field required")
        if (params_problem := _params_problem(item["params"])) is not None:
            name, message = params_problem
            return _error_path(f"{where}.params{name}", message)
    return None


def _custom_id_problem(value: Any, given: bool) -> str | None:
    if not given:
        return "Field required"
    if not isinstance(value, str):
        return "Input should be a valid string"
    if not value:
        return "String should have at least 1 character"
    if len(value) > 64:
        return "String should have at most 64 characters"
    if not CUSTOM_ID.match(value):
        return f"String should match pattern '{CUSTOM_ID.pattern}'"
    return None


def _params_problem(params: Any) -> tuple[str, str] | None:
    """The Messages API params' required fields and their types; the rest is checked later,
    while processing, as the service does."""
    if not isinstance(params, dict):
        return "", "Input should be a valid dictionary"
    for name in ("max_tokens", "messages", "model"):
        if name not in params:
            return f".{name}", "Field required"
    max_tokens = params["max_tokens"]
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        return ".max_tokens", "Input should be a valid integer"
    if max_tokens < 1:  # a batch cannot pre-warm a cache with max_tokens 0
        return ".max_tokens", "Input should be greater than or equal to 1"
    if not isinstance(params["messages"], list):
        return ".messages", "Input should be a valid list"
    if not isinstance(params["model"], str):
        return ".model", "Input should be a valid string"
    if params.get("stream") not in (None, False):
        return ".stream", "Input should be False"
    return None


def _shuffled(ids: list[str]) -> list[str]:
    """The results file's order: never the request order when there is another one, so a
    client that matches rows by position fails at once."""
    order = ids[:]
    random.shuffle(order)
    if len(order) > 1 and order == ids:
        order = order[1:] + order[:1]
    return order


class MessageBatches:
    """The batch routes and their state. All state changes happen under one lock; results are
    computed under it too, the first time a batch is seen ended."""

    def __init__(self, host: BatchHost) -> None:
        self._host = host
        self._lock = threading.Lock()
        self._batches: dict[str, _Batch] = {}  # in creation order
        self._calls: list[BatchCall] = []
        self._per_model: Counter[str] = Counter()

    def mount(self, router: web.UrlDispatcher) -> None:
        router.add_post(_PREFIX, self._create)
        router.add_get(_PREFIX, self._list)
        router.add_get(_PREFIX + "/{batch_id}", self._retrieve)
        router.add_delete(_PREFIX + "/{batch_id}", self._delete)
        router.add_post(_PREFIX + "/{batch_id}/cancel", self._cancel)
        router.add_get(_PREFIX + "/{batch_id}/results", self._results)

    # -- what tests read ------------------------------------------------------------------

    @property
    def calls(self) -> list[BatchCall]:
        with self._lock:
            return list(self._calls)

    @property
    def per_model(self) -> dict[str, int]:
        with self._lock:
            return dict(self._per_model)

    def snapshot(self) -> list[RecordedBatch]:
        now = time.time()
        with self._lock:
            return [self._record(batch, now) for batch in self._batches.values()]

    def clear(self) -> None:
        with self._lock:
            self._batches.clear()
            self._calls.clear()
            self._per_model.clear()

    def _record(self, batch: _Batch, now: float) -> RecordedBatch:
        status = self._status(batch, now)
        return RecordedBatch(
            id=batch.id,
            processing_status=status,
            custom_ids=tuple(e.custom_id for e in batch.entries),
            models=tuple(e.plan.model for e in batch.entries),
            behaviours=tuple(e.plan.behaviour for e in batch.entries),
            headers=dict(batch.headers),
            results=dict(batch.results),
            cancel_initiated=batch.cancel_at is not None,
            deleted=batch.deleted,
        )

    # -- state ------------------------------------------------------------------------------

    def _status(self, batch: _Batch, now: float) -> str:
        """The batch's processing status now, computing its results when it has just ended;
        call with the lock held."""
        if batch.ended is None:
            end = batch.end_time()
            if now < end:
                return "in_progress" if batch.cancel_at is None else "canceling"
            self._finish(batch, end)
        return "ended"

    def _finish(self, batch: _Batch, end: float) -> None:
        unprocessed = "canceled" if batch.cancel_at is not None else "expired"
        results: dict[str, dict[str, Any]] = {}
        for entry in batch.entries:
            if entry.done_at is not None and entry.done_at <= end:
                results[entry.custom_id] = self._host.batch_result(entry.params, entry.plan)
            else:
                results[entry.custom_id] = {"type": unprocessed}
        order = _shuffled([e.custom_id for e in batch.entries])
        batch.results = {cid: results[cid] for cid in order}
        batch.ended = end

    def _view(self, batch: _Batch, now: float) -> dict[str, Any]:
        """The ``MessageBatch`` object (anthropic-sdk-python: types/messages/message_batch.py)."""
        status = self._status(batch, now)
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if status == "ended":
            counts.update(Counter(r["type"] for r in batch.results.values()))
        else:  # rows move out of "processing" only once the whole batch has ended
            counts["processing"] = len(batch.entries)
        ended = batch.ended if status == "ended" else None
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": status,
            "request_counts": counts,
            "ended_at": stamp(ended) if ended is not None else None,
            "created_at": stamp(batch.created),
            "expires_at": stamp(batch.created + LIFETIME_S),
            "archived_at": None,
            "cancel_initiated_at": stamp(batch.cancel_at) if batch.cancel_at else None,
            "results_url": (
                f"{self._host.url}{_PREFIX}/{batch.id}/results" if ended is not None else None
            ),
        }

    # -- routes -----------------------------------------------------------------------------

    def _note(self, request: web.Request, body: Any = None) -> web.Response | None:
        headers = {k.lower(): v for k, v in request.headers.items()}
        with self._lock:
            self._calls.append(BatchCall(request.method, request.path, headers, body))
        return self._host.batch_rejection(request)

    def _find(self, request: web.Request) -> _Batch | web.Response:
        """The batch the path names (call with the lock held), or the service's 404."""
        batch_id = request.match_info["batch_id"]
        batch = self._batches.get(batch_id)
        if batch is None or batch.deleted:
            return self._host.batch_error(
                404, "not_found_error", f"message_batch: {batch_id} not found (stub)"
            )
        return batch

    def _located(self, request: web.Request) -> _Batch | web.Response:
        """The call noted, then the batch its path names, or what to answer instead."""
        if (rejection := self._note(request)) is not None:
            return rejection
        with self._lock:
            return self._find(request)

    def _refuse(self, batch: _Batch, why: str) -> web.Response:
        """What the service answers a call the batch's state does not allow."""
        return self._host.batch_error(
            400, "invalid_request_error", f"message_batch {batch.id} {why} (stub)"
        )

    async def _read(self, request: web.Request) -> bytes | web.Response:
        """The body, up to the batch limit (aiohttp's own 1 MB limit stays the real-time
        routes'); a larger one is read to its end, so that the client hears the 413."""
        limit = self._host.batch_max_bytes
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
        if size > limit:
            return self._host.batch_error(
                413, "request_too_large", "Request exceeds the maximum allowed number of bytes"
            )
        return b"".join(chunks)

    async def _create(self, request: web.Request) -> web.Response:
        raw = await self._read(request)
        if isinstance(raw, web.Response):
            self._note(request)
            return raw
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = None
        if (rejection := self._note(request, body)) is not None:
            return rejection
        if (problem := _validate(body, MAX_REQUESTS)) is not None:
            return self._host.batch_error(400, "invalid_request_error", problem)
        requests: list[dict[str, Any]] = body["requests"]
        plans = [self._host.batch_plan(item["params"]) for item in requests]
        created = time.time()
        seconds = max(0.0, self._host.batch_seconds)
        expire = self._host.expire_batches
        entries = []
        for i, (item, plan) in enumerate(zip(requests, plans, strict=True)):
            done: float | None = None  # never processed: expiry or a cancel ends it
            if not expire and plan.extra_s is not None:
                done = created + seconds * (i + 1) / len(requests) + plan.extra_s
            entries.append(_Entry(str(item["custom_id"]), item["params"], plan, done))
        batch = _Batch(
            id=rid("msgbatch_01"),
            created=created,
            entries=entries,
            headers={k.lower(): v for k, v in request.headers.items()},
            lifetime_s=seconds if expire else LIFETIME_S,
        )
        with self._lock:
            self._batches[batch.id] = batch
            self._per_model.update(plan.model for plan in plans)
            view = self._view(batch, created)
        return self._json(view)

    async def _retrieve(self, request: web.Request) -> web.Response:
        batch = self._located(request)
        if isinstance(batch, web.Response):
            return batch
        with self._lock:
            view = self._view(batch, time.time())
        return self._json(view)

    async def _cancel(self, request: web.Request) -> web.Response:
        batch = self._located(request)
        if isinstance(batch, web.Response):
            return batch
        now = time.time()
        with self._lock:
            if self._status(batch, now) == "ended":
                return self._refuse(batch, "has ended and can no longer be canceled")
            if batch.cancel_at is None:
                batch.cancel_at = now
            view = self._view(batch, now)
        return self._json(view)

    async def _delete(self, request: web.Request) -> web.Response:
        batch = self._located(request)
        if isinstance(batch, web.Response):
            return batch
        with self._lock:
            if self._status(batch, time.time()) != "ended":
                return self._refuse(batch, "is still processing; cancel it before deleting it")
            batch.deleted = True
        return self._json({"id": batch.id, "type": "message_batch_deleted"})

    async def _results(self, request: web.Request) -> web.Response:
        batch = self._located(request)
        if isinstance(batch, web.Response):
            return batch
        with self._lock:
            if self._status(batch, time.time()) != "ended":
                return self._refuse(batch, "has not ended; its results are not ready")
            rows = list(batch.results.items())
        lines = "".join(
            json.dumps({"custom_id": cid, "result": result}) + "\n" for cid, result in rows
        )
        # The SDK asks for application/binary (and decodes whatever comes); the API reference
        # documents application/x-jsonl.
        accept = request.headers.get("accept", "")
        kind = "application/binary" if "application/binary" in accept else "application/x-jsonl"
        return web.Response(
            body=lines.encode(), headers={"Content-Type": kind, "request-id": rid("req_01")}
        )

    async def _list(self, request: web.Request) -> web.Response:
        if (rejection := self._note(request)) is not None:
            return rejection
        query = request.query
        try:
            limit = int(query.get("limit", "20"))
        except ValueError:
            return self._host.batch_error(
                400, "invalid_request_error", "limit: Input should be a valid integer"
            )
        if not 1 <= limit <= 1000:
            bound = "greater than or equal to 1" if limit < 1 else "less than or equal to 1000"
            return self._host.batch_error(
                400, "invalid_request_error", f"limit: Input should be {bound}"
            )
        now = time.time()
        with self._lock:
            newest_first = [b for b in reversed(self._batches.values()) if not b.deleted]
            ids = [b.id for b in newest_first]
            after, before = query.get("after_id"), query.get("before_id")
            for name, cursor in (("after_id", after), ("before_id", before)):
                if cursor is not None and cursor not in ids:
                    return self._host.batch_error(
                        400, "invalid_request_error", f"{name}: no such message_batch (stub)"
                    )
            if before is not None:  # the page just newer than the cursor
                stop = ids.index(before)
                start = max(0, stop - limit)
                has_more = start > 0
            else:
                start = ids.index(after) + 1 if after is not None else 0
                stop = start + limit
                has_more = stop < len(ids)
            data = [self._view(b, now) for b in newest_first[start:stop]]
        return self._json(
            {
                "data": data,
                "has_more": has_more,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        )

    @staticmethod
    def _json(payload: Mapping[str, Any]) -> web.Response:
        return web.json_response(dict(payload), headers={"request-id": rid("req_01")})
