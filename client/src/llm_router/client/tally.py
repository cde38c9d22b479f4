"""Results counted as they end, in one process: a worker's for its heartbeat, a
backfill's for its progress and summary."""

from __future__ import annotations

import time
from collections import Counter


class Tally:
    """By status; ``ok`` ones by the model that answered; any by the reason given."""

    def __init__(self) -> None:
        self.by_status: Counter[str] = Counter()
        self.per_model: Counter[str] = Counter()
        self.per_reason: Counter[str] = Counter()
        #: When the last result was counted (Unix seconds).
        self.last_at: float | None = None

    def count(self, status: str, model: str | None = None, reason: str | None = None) -> None:
        self.by_status[status] += 1
        if status == "ok" and model:
            self.per_model[model] += 1
        if reason is not None:
            self.per_reason[reason] += 1
        self.last_at = time.time()

    @property
    def total(self) -> int:
        return sum(self.by_status.values())

    @property
    def ok(self) -> int:
        return self.by_status["ok"]

    @property
    def invalid(self) -> int:
        return self.by_status["invalid_request"]

    @property
    def failed(self) -> int:
        """Everything neither ``ok`` nor ``invalid_request``."""
        return self.total - self.ok - self.invalid
