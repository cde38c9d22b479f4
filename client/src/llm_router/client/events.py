"""The metrics event: what a worker publishes on the metrics channel after each routed job.

The worker builds it in ``llm_router.worker.metrics.event_payload``; this model
only describes it, for the shipped JSON Schema (``wire/metrics_event.schema.json``)
and for subscribers that want to read it typed. Like a result, an event may gain
fields in a later release: a reader ignores those it does not know.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from llm_router.client.counters import ModelCounts
from llm_router.client.protocol import Attempt, Status

BreakerState = Literal["closed", "open", "half_open"]


class MetricsEvent(BaseModel):
    """One routed job (``ok``, ``failed`` or ``invalid_request``), as announced once."""

    model_config = ConfigDict(extra="ignore")

    job_id: str | None
    context: str | None
    chain: str | None
    status: Status
    model_used: str
    latency_ms: int
    cost_usd: float = Field(description="what every attempt of this job cost, in USD")
    cached: bool = Field(
        default=False,
        description="answered from the response cache: no attempts, no model called, cost 0",
    )
    attempts: list[Attempt]
    metrics_snapshot: dict[str, ModelCounts] = Field(
        description="every model's counters after this job was counted"
    )
    breakers: dict[str, BreakerState] = Field(
        description="each model's circuit breaker, as this job's worker last saw it"
    )
    timestamp: float = Field(description="when the event was built, Unix seconds")
