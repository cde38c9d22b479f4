"""The queues a worker serves, interactive before batch, and the job slots each may fill.

A backfill puts hundreds of thousands of jobs on the batch queue, most of which
wait for the one local model. If they could fill every job slot, an interactive
request would wait behind them for a slot; so batch work fills at most
``batch_max_jobs`` of a worker's ``max_jobs``, the rest is kept for interactive
work, and every claim looks at the interactive queue first.

A queue with a backlog (the last claim got all it asked for) is claimed from
again as soon as a slot frees: producers push at most ``WAKE_TOKENS_MAX`` wake-up
tokens, so a queue filled faster than that would otherwise drain at the poll rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from llm_router.client.keys import wake_key

LaneKind = Literal["interactive", "batch"]


@dataclass(slots=True)
class Lane:
    """One queue a worker serves, and what it has running from it."""

    kind: LaneKind
    name: str
    max_jobs: int
    keep_result_s: int
    running: int = 0
    backlog: bool = False

    @property
    def wake_key(self) -> str:
        return wake_key(self.name)

    def room(self, free: int) -> int:
        """Jobs this queue may start now, out of ``free`` slots of the worker."""
        return max(0, min(free, self.max_jobs - self.running))


class Lanes:
    """The interactive queue, then the batch queue (when it has one)."""

    def __init__(
        self,
        interactive: str,
        batch: str | None,
        *,
        max_jobs: int,
        batch_max_jobs: int | None,
        keep_result_s: int,
        batch_keep_result_s: int,
    ) -> None:
        self.queues: list[Lane] = [Lane("interactive", interactive, max_jobs, keep_result_s)]
        if batch is not None and batch != interactive:
            share = batch_share(max_jobs, batch_max_jobs)
            self.queues.append(Lane("batch", batch, share, batch_keep_result_s))
        self.interactive = self.queues[0]

    @property
    def names(self) -> list[str]:
        return [q.name for q in self.queues]

    def wants(self, free: int) -> list[int]:
        """How many jobs each queue may give, in claim order (the claim caps the total)."""
        return [q.room(free) for q in self.queues]

    def claimed(self, wants: Sequence[int], got: Sequence[int]) -> None:
        """A claim that got all it asked for may have left more behind."""
        for queue, want, n in zip(self.queues, wants, got, strict=True):
            if want > 0:
                queue.backlog = n >= want

    def wake_keys(self, free: int) -> list[str]:
        """The wake-up lists worth taking a token from with ``free`` slots."""
        return [q.wake_key for q in self.queues if q.room(free) > 0]

    def backlog_waiting(self, free: int) -> bool:
        """A freed slot can take a job that is known to be waiting: claim now."""
        return any(q.backlog and q.room(free) > 0 for q in self.queues)


def batch_share(max_jobs: int, batch_max_jobs: int | None = None) -> int:
    """Slots batch work may fill: ``batch_max_jobs`` up to ``max_jobs``; by default a
    fifth of them (at least one) stays free for interactive work."""
    if batch_max_jobs is not None:
        return min(batch_max_jobs, max_jobs)
    return max(1, max_jobs - max(1, max_jobs // 5))
