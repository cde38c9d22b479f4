"""Worker heartbeats: who is serving which queue right now, readable by anyone.

Each worker keeps ``llm_router:worker:<worker_id>`` (a JSON :class:`Heartbeat`)
alive with a short TTL and lists itself in the sorted set ``llm_router:workers``
(score: when its heartbeat lapses, Unix ms). A worker that is killed stops
renewing; its key expires within :data:`HEARTBEAT_TTL_S` and readers drop it.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.asyncio import Redis

from llm_router.client.keys import WORKERS_KEY, heartbeat_key

#: A heartbeat lapses this long after its last renewal; workers renew it every third.
HEARTBEAT_TTL_S = 15


class Heartbeat(BaseModel):
    """What one worker process says about itself, every few seconds."""

    model_config = ConfigDict(extra="ignore")

    worker_id: str
    host: str
    pid: int
    version: str
    state: Literal["serving", "stopping"] = "serving"
    started_at: float = Field(description="Unix seconds")
    at: float = Field(description="Unix seconds of this heartbeat")
    queues: list[str] = Field(description="queues served, interactive first")
    max_jobs: int
    batch_max_jobs: int
    running: dict[str, int] = Field(default_factory=dict, description="jobs running per queue")
    done: dict[str, int] = Field(
        default_factory=dict, description="jobs finished since start, by result status"
    )
    last_job_at: float | None = None
    breakers: dict[str, str] = Field(default_factory=dict, description="model -> state")
    chains: dict[str, list[str]] = Field(default_factory=dict)
    metrics_port: int | None = None
    #: The worker's last look at its Redis server (llm_router.client.server.ServerState).
    redis: dict[str, Any] | None = None
    #: Message Batches since start: jobs this worker parked, parked jobs its polls put
    #: back, batches it sent (absent: no model of its chains has ``batch_api``).
    batches: dict[str, int] | None = None

    @property
    def running_total(self) -> int:
        return sum(self.running.values())

    @property
    def done_total(self) -> int:
        return sum(self.done.values())


async def live_workers(redis: Redis, *, now_ms: int | None = None) -> list[Heartbeat]:
    """Every worker whose heartbeat has not lapsed, oldest first; two round trips."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    ids: list[bytes] = await redis.zrangebyscore(WORKERS_KEY, now, "+inf")
    if not ids:
        return []
    blobs: list[bytes | None] = await redis.mget([heartbeat_key(i.decode()) for i in ids])
    beats: list[Heartbeat] = []
    for blob in blobs:
        if blob is None:
            continue  # stopped cleanly between the two reads, or expired
        try:
            beats.append(Heartbeat.model_validate_json(blob))
        except ValidationError:
            continue  # written by a newer or broken worker: not ours to judge
    return sorted(beats, key=lambda b: b.started_at)


def serving(beats: list[Heartbeat], queue: str) -> list[Heartbeat]:
    return [b for b in beats if b.state == "serving" and queue in b.queues]
