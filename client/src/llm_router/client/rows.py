"""A backfill's rows: input lines read and checked, job ids, output rows and the output file.

A row's job id and its reply list are hashes of the output file's real path, the row's
id and its request, so a rerun of the same command finds its own jobs again. The output
file is the record of what is done: whole lines, fsynced before results are dropped.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple, cast

from pydantic import ValidationError

from llm_router.client.client import build_request
from llm_router.client.idset import IdSet
from llm_router.client.keys import REPLY_PREFIX
from llm_router.client.protocol import JOB_FUNCTION, RouteRequest, RouteResult, decode

#: Most rows in one write (and fsync, and DEL of their results): after a kill, only the
#: last write's results can still be in Redis, so a rerun knows which rows to look at.
WRITE_MAX = 2000
_ROW_KEYS = frozenset({"id", "messages", "prompt", "schema", "metadata"})


class BackfillError(Exception):
    """The run cannot start: unusable files (the message says which and why)."""


def run_key(output_path: str | os.PathLike[str]) -> str:
    """The output file's real absolute path: what ties reruns together, and only them."""
    return os.path.realpath(output_path)


# canonical_json's settings, one encoder for every row (json.dumps builds one per call).
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def canonical_request(request: RouteRequest) -> bytes:
    """The request as it travels, keys sorted: one text per request, whatever the key
    order of the line it came from (as :func:`~llm_router.client.schemas.canonical_json`)."""
    return _CANONICAL.encode(request.wire()).encode("utf-8", "backslashreplace")  # as encode()


def job_id_for(key: str, row_id: str, request: RouteRequest | bytes) -> str:
    """The same row with the same request in the same output file: the same job.

    ``request`` may be given as its :func:`canonical_request` text, already made.
    """
    text = request if isinstance(request, bytes) else canonical_request(request)
    parts = (key.encode("utf-8", "surrogatepass"), row_id.encode("utf-8", "surrogatepass"), text)
    return "backfill:" + hashlib.sha256(b"\0".join(parts)).hexdigest()[:40]


def job_blob_of(canonical: bytes, enqueue_ms: int, reply_to: str) -> bytes:
    """:func:`~llm_router.client.protocol.job_blob` around a request already encoded
    (by :func:`canonical_request`): the same JSON value, keys of the request sorted.
    Encoding each row's request once, not twice, is a fifth of the enqueue's work; a
    unit test holds the two equal."""
    head, tail = _envelope(reply_to)
    return b"%s%s%s%d}" % (head, canonical, tail, enqueue_ms)


@functools.lru_cache(maxsize=8)
def _envelope(reply_to: str) -> tuple[bytes, bytes]:
    """job_blob's text before and after the request, up to the enqueue time."""
    text = _COMPACT.encode({"t": 1, "f": JOB_FUNCTION, "a": [0], "k": {"reply_to": reply_to}})
    head, tail = text.encode("utf-8").split(b"[0]", 1)
    return head + b"[", b"]" + tail[:-1] + b',"et":'


def reply_key_for(key: str) -> str:
    """One reply list per output file, so a rerun hears results pushed while it was gone."""
    return REPLY_PREFIX + "backfill:" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:24]


def derived_id(lineno: int, raw: bytes) -> str:
    """An id for a line without one: the same on every rerun of the same file."""
    digest = hashlib.sha256(raw.rstrip(b"\r\n")).hexdigest()[:12]
    return f"line{lineno}-{digest}"


# --- rows ---------------------------------------------------------------------------------


class RowRef(NamedTuple):
    """What the output line needs of a row besides its result; held only while in flight.

    Atoms only (the metadata as its JSON): in flight it is kept as a plain tuple of
    these, which the garbage collector stops tracking, so that a hundred thousand rows
    in flight cost no collection time.
    """

    id: str
    line: int
    metadata_json: bytes | None = None
    #: When it was queued (monotonic seconds), for the safety net's age limit.
    since: float = 0.0

    @classmethod
    def of(cls, row_id: str, line: int, metadata: dict[str, Any] | None) -> RowRef:
        if metadata is None:
            return cls(row_id, line)
        return cls(row_id, line, _COMPACT.encode(metadata).encode("utf-8", "backslashreplace"))

    @property
    def metadata(self) -> dict[str, Any] | None:
        if self.metadata_json is None:
            return None
        return cast(dict[str, Any], decode(self.metadata_json))


def output_row(row: RowRef, result: RouteResult) -> dict[str, Any]:
    """One output line's fields: the one place to add more later."""
    out: dict[str, Any] = {
        "id": row.id,
        "line": row.line,
        "status": result.status,
        "content": result.content,
        "model_used": result.model_used,
        "attempts": [attempt.model_dump(mode="json") for attempt in result.attempts],
        "latency_ms": result.latency_ms,
        "error": result.error,
        "cost_usd": result.cost_usd,
    }
    if result.cached:  # answered from the response cache: no model was called
        out["cached"] = True
    if row.metadata is not None:
        out["metadata"] = row.metadata
    return out


_REASON_CLASS = re.compile(r"\s*([A-Za-z_][\w.]*)")


def failure_reason(result: RouteResult) -> str | None:
    """A short label for a row that did not succeed; None when it did."""
    if result.status == "ok":
        return None
    if result.status == "invalid_request":
        return "invalid"
    reasons = [a.reason for a in result.attempts if a.outcome in ("rejected", "invalid")]
    reasons += [a.reason for a in result.attempts]
    text = next((r for r in reasons if r), None) or result.error or "failed"
    match = _REASON_CLASS.match(text)
    return match.group(1)[:60] if match else text[:60]


class Rejected(ValueError):
    """A line that cannot become a request; the message says why (without the line no.)."""


@dataclass(slots=True)
class Claim:
    """A JSON object line with the id it will be known by."""

    id: str
    line: int
    fields: dict[str, Any]


class RowParser:
    """Turns an input line into a request, checked as the worker will check it.

    The shared ``schema``, ``chain`` and ``context`` are checked once, here (a bad one
    is :class:`Rejected`, not a run of invalid rows); rows that use the shared schema
    are then checked without it and given it afterwards, so its every node is not
    walked again for every row. A row's own ``schema`` is checked with the row.
    """

    def __init__(
        self,
        *,
        schema: dict[str, Any] | None = None,
        chain: str | None = None,
        context: str | None = None,
        expires_in: float | None = None,
        cache_ttl: int | None = None,
    ) -> None:
        self.schema = schema
        self.chain = chain
        self.context = context
        self.expires_in = expires_in
        self.cache_ttl = cache_ttl
        try:
            build_request(
                "check",
                schema=schema,
                context=context,
                chain=chain,
                expires_in=expires_in,
                cache_ttl=cache_ttl,
            )
        except ValidationError as exc:
            raise Rejected(_first_error(exc)) from None

    @staticmethod
    def claim(lineno: int, raw: bytes) -> Claim:
        """Parse the line and find its id; :class:`Rejected` when it has no usable shape."""
        try:
            fields = json.loads(raw)
        except RecursionError:
            raise Rejected("the line is nested too deeply to parse") from None
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, huge integers
            raise Rejected(f"not JSON: {exc}") from None
        if not isinstance(fields, dict):
            raise Rejected(f"expected a JSON object, got {type(fields).__name__}")
        unknown = fields.keys() - _ROW_KEYS
        if unknown:
            names = ", ".join(sorted(repr(k) for k in unknown)[:5])
            raise Rejected(f"unknown field(s) {names}; allowed: {', '.join(sorted(_ROW_KEYS))}")
        given = fields.get("id")
        if given is None:
            if "id" in fields:
                raise Rejected("id must be a string or an integer, not null")
            return Claim(derived_id(lineno, raw), lineno, fields)
        if isinstance(given, bool) or not isinstance(given, str | int):
            raise Rejected(f"id must be a string or an integer, not {type(given).__name__}")
        row_id = given if isinstance(given, str) else str(given)
        if not row_id or len(row_id) > 1000:
            raise Rejected("id must be 1 to 1000 characters")
        return Claim(row_id, lineno, fields)

    def request(self, claim: Claim) -> RouteRequest:
        """The row's request; :class:`Rejected` with the first problem found."""
        fields = claim.fields
        has_messages, has_prompt = "messages" in fields, "prompt" in fields
        if has_messages == has_prompt:
            raise Rejected("give exactly one of 'messages' (a list) or 'prompt' (a string)")
        messages = fields["messages"] if has_messages else fields["prompt"]
        if has_messages and not isinstance(messages, list):
            raise Rejected("messages must be a list of chat messages")
        if has_prompt and not isinstance(messages, str):
            raise Rejected("prompt must be a string")
        shared = "schema" not in fields  # a row's own schema (even null) wins
        try:
            request = build_request(
                messages,
                schema=None if shared else fields["schema"],
                context=self.context,
                chain=self.chain,
                metadata=fields.get("metadata"),
                expires_in=self.expires_in,
                cache_ttl=self.cache_ttl,
            )
        except ValidationError as exc:
            raise Rejected(_first_error(exc)) from None
        if shared and self.schema is not None:
            request = request.model_copy(update={"json_schema": self.schema})
        return request


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]


# --- files --------------------------------------------------------------------------------


class InputLines:
    """The input, one non-blank line at a time; never more than one line in memory."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._file: IO[bytes] = open(path, "rb")  # noqa: SIM115 - closed by close()
        self.exhausted = False
        #: Blank lines read so far (the quick count of lines includes them).
        self.blank = 0

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        for lineno, raw in enumerate(self._file, start=1):
            if raw.strip():
                yield lineno, raw
            else:
                self.blank += 1
        self.exhausted = True

    def count_rest(self) -> int:
        """Rows not read yet (for the count of missing rows when a run stops early)."""
        return sum(1 for raw in self._file if raw.strip())

    def close(self) -> None:
        self._file.close()

    @staticmethod
    def count(path: str | os.PathLike[str]) -> int:
        """Lines in the file, by counting newlines in large chunks (blank ones included)."""
        lines, last = 0, b"\n"
        with open(path, "rb") as file:
            while chunk := file.read(1 << 20):
                lines += chunk.count(b"\n")
                last = chunk[-1:]
        return lines + (last != b"\n")


class OutputFile:
    """The output: the ids it already has, and durable appends of whole lines."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        #: Input line numbers of the last rows on file: a run killed between writing them
        #: and deleting their results from Redis left those results behind.
        self.recent_lines: frozenset[int] = frozenset()

    def resume(self) -> IdSet:
        """Cut a half-written last line (a killed run); the ids of the rest, as WRITTEN."""
        written = IdSet()
        if not self.path.exists():
            return written
        end = 0
        recent: deque[int] = deque(maxlen=WRITE_MAX)
        with open(self.path, "rb") as file:
            for lineno, raw in enumerate(file, start=1):
                if not raw.endswith(b"\n"):
                    break
                end += len(raw)
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw)
                    row_id = row["id"]
                except (ValueError, KeyError, TypeError, RecursionError):
                    raise BackfillError(
                        f"{self.path}: line {lineno} is not a backfill output row; "
                        "not appending to this file"
                    ) from None
                if not isinstance(row_id, str):
                    raise BackfillError(f"{self.path}: line {lineno} has no string 'id'")
                written.add(row_id, IdSet.WRITTEN)
                if isinstance(line := row.get("line"), int):
                    recent.append(line)
            size = file.seek(0, os.SEEK_END)
        with open(self.path, "r+b") as file:
            if size != end:
                file.truncate(end)
            os.fsync(file.fileno())  # what a killed run wrote is on disk before we go on
        self.recent_lines = frozenset(recent)
        return written

    def open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write_durably(self, data: bytes) -> None:
        """Append complete lines in one write, then fsync: after this they survive a crash."""
        assert self._fd is not None, "open() first"
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
