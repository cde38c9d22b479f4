"""The route job in this process, without a queue: for tests and benchmarks that judge
what a worker makes of a job blob without Redis or a worker process."""

from __future__ import annotations

import json
from typing import Any

from llm_router.worker.lanes import Lanes
from llm_router.worker.queue import Claimed

_LANES = Lanes(
    "inproc", "inproc:batch", max_jobs=1, batch_max_jobs=1, keep_result_s=60, batch_keep_result_s=60
)


def job_blob(request: Any, **fields: Any) -> bytes:
    """An arq job blob for ``route(request)``, as producers write it."""
    return json.dumps({"t": 1, "f": "route", "a": [request], "k": {}, "et": 1, **fields}).encode()


def claimed(job_id: str, blob: bytes | None, *, tries: int = 1, batch: bool = False) -> Claimed:
    """A job as the loop hands it to the job runner after claiming it."""
    lane = _LANES.queues[1] if batch else _LANES.interactive
    return Claimed(job_id, lane, 1, blob, tries)
