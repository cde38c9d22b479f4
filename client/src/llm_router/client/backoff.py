"""Waiting out a Redis that does not answer: waits that double after each failure."""

from __future__ import annotations


class Backoff:
    """``first``, then twice as long after each failure, never more than ``most``
    seconds; :meth:`reset` once a call succeeds."""

    def __init__(self, first: float, most: float) -> None:
        self.first = first
        self.most = most
        self.failures = 0

    def next(self) -> float:
        """Count a failure; the seconds to wait before the next try."""
        wait = min(self.first * 2.0 ** min(self.failures, 30), self.most)
        self.failures += 1
        return wait

    def reset(self) -> None:
        self.failures = 0
