"""Result blobs shaped as the worker writes them, and attempt fields, for unit tests."""

from __future__ import annotations

from typing import Any

from llm_router.client.keys import DEFAULT_QUEUE
from llm_router.client.protocol import RouteResult, encode


def result_blob(r: RouteResult | Any, job_id: str = "j1") -> bytes:
    """An arq result blob; ``r`` is a RouteResult or any raw value (for malformed cases)."""
    inner = r.model_dump(mode="json") if isinstance(r, RouteResult) else r
    return encode(
        {"t": 1, "f": "route", "a": [], "k": {}, "et": 1, "s": True, "r": inner,
         "st": 2, "ft": 3, "q": DEFAULT_QUEUE, "id": job_id}
    )  # fmt: skip


#: The usage fields of an attempt that got no answer (and called no named server).
NO_USAGE: dict[str, object] = {
    "input_tokens": None,
    "output_tokens": None,
    "cache_read_input_tokens": None,
    "cache_creation_input_tokens": None,
    "cost_usd": 0.0,
    "finish_reason": None,
    "deployment": None,
    "batch_id": None,
}
