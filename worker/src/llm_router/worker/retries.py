"""Which failed calls are worth repeating on the same model, and after how long.

A 429 or 529 from Anthropic says "try again in a second"; falling back at once sends
the job to the next, dearer model. A transient failure is retried on the same model
as the answer's ``retry-after-ms`` / ``retry-after`` header says (else after a short
exponential backoff with jitter), but only while the model's own deadline has room.
What cannot get better (400, 401, 403, 404, 413, a spend limit) falls back at once.
"""

from __future__ import annotations

import email.utils
import random
import re
import time
from collections.abc import Mapping
from typing import Any

import litellm

#: Overloaded, rate limited, or a server error that the next try may not have.
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504, 529})
#: Backoff without a header: 0.5 s, 1 s, 2 s ... at most this, times a jitter of 0.5-1.
MAX_BACKOFF_S = 8.0
#: A retry is made only if at least this much of the deadline is left after its wait.
MIN_TRY_S = 0.5
_SPEND_LIMIT = re.compile(r"spend|billing|credit|quota|usage limit", re.IGNORECASE)


def header_delay(headers: Mapping[str, Any] | None) -> float | None:
    """Seconds the server asks to wait: ``retry-after-ms``, else ``retry-after`` (seconds
    or an HTTP date); None when it says nothing usable."""
    if not headers:
        return None
    lowered = {str(k).lower(): str(v) for k, v in headers.items()}
    try:
        if "retry-after-ms" in lowered:
            return max(0.0, float(lowered["retry-after-ms"]) / 1000)
    except ValueError:
        pass
    value = lowered.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff(retry: int, rng: random.Random | None = None) -> float:
    """The wait before retry number ``retry`` (0-based) when the server gave none."""
    jitter: float = (rng or random).uniform(0.5, 1.0)
    return min(MAX_BACKOFF_S, 0.5 * 2.0**retry) * jitter


def headers_of(exc: BaseException) -> Mapping[str, Any] | None:
    headers = getattr(exc, "litellm_response_headers", None)
    if headers is None:
        response = getattr(exc, "response", None)
        headers = getattr(response, "headers", None)
    return headers if isinstance(headers, Mapping) else None


def retry_delay(exc: BaseException, retry: int) -> float | None:
    """How long to wait before trying the same model again, or None: do not."""
    if isinstance(exc, TimeoutError | litellm.exceptions.Timeout):
        return None  # the deadline is spent
    status = getattr(exc, "status_code", None)
    connection = isinstance(exc, ConnectionError | litellm.exceptions.APIConnectionError)
    if not connection and status not in RETRYABLE_STATUS:
        return None
    delay = header_delay(headers_of(exc))
    if status == 429 and delay is None and _SPEND_LIMIT.search(str(exc)):
        return None  # waiting will not raise a spend limit
    return delay if delay is not None else backoff(retry)
