"""A parked job's state: what the router hands over when a batch-lane job parks at a
``batch_api`` model, and what a worker reads back to resume it (``park.lua`` writes the
hash, ``unpark.lua`` adds the batch's result)."""

from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from llm_router.client.protocol import Attempt, now_ms
from llm_router.worker.budgets import Hold

#: How long a parked job and its state are kept: batches end within 24 h.
PARK_KEEP_MS = 48 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class ParkOrder:
    """What the router asks for a job that reached a ``batch_api`` model of the batch
    lane: park it at chain ``position`` with the attempts made so far."""

    model: str
    position: int
    attempts: list[Attempt]
    params: dict[str, Any]
    hold: Hold
    #: When the job's walk began (Unix ms): its result's latency counts from there.
    started_ms: int
    custom_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    parked_ms: int = field(default_factory=now_ms)

    def state(self) -> str:
        return json.dumps(
            {
                "model": self.model,
                "position": self.position,
                "attempts": [a.model_dump(mode="json", exclude_none=True) for a in self.attempts],
                "hold": dataclasses.asdict(self.hold),
                "started_ms": self.started_ms,
            },
            separators=(",", ":"),
        )

    def entry(self, job_id: str) -> str:
        """The request as it waits to be sent; ``ms`` (when parked) first, where
        ``msgbatch_take.lua`` reads it."""
        return json.dumps(
            {"ms": self.parked_ms, "custom_id": self.custom_id, "job_id": job_id,
             "params": self.params},
            separators=(",", ":"),
            ensure_ascii=False,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class ParkedJob:
    """A parked job's state read back; ``result`` None: its batch has not ended."""

    model: str
    position: int
    attempts: list[Attempt]
    hold: Hold
    started_ms: int
    parked_ms: int
    custom_id: str
    result: dict[str, Any] | None = None
    batch_id: str | None = None
    #: It stopped waiting (cancelled, or past its deadline) before its batch answered.
    stopped: bool = False


def parse_parked(fields: dict[bytes, bytes]) -> ParkedJob | None:
    """The hash ``park.lua`` wrote, or None when there is none (or it is unreadable)."""
    try:
        state = json.loads(fields[b"state"])
        result = json.loads(fields[b"result"]) if b"result" in fields else None
        return ParkedJob(
            model=state["model"],
            position=int(state["position"]),
            attempts=[Attempt.model_validate(a) for a in state["attempts"]],
            hold=Hold(**state["hold"]),
            started_ms=int(state["started_ms"]),
            parked_ms=int(fields[b"parked_ms"]),
            custom_id=fields[b"custom_id"].decode(),
            result=result if isinstance(result, dict) else None,
            batch_id=fields[b"batch_id"].decode() if b"batch_id" in fields else None,
            stopped=b"stopped" in fields,
        )
    except (KeyError, ValueError, TypeError):
        return None
