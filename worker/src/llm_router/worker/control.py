"""What the loop may tell a job while it runs: its deadline, and that it is cancelled.

A job with a deadline (a version 2 request's ``expires_in``) starts no model after it;
a cancelled job stops at once, its model call abandoned. The loop sets ``cancelled``
before it cancels the job's task, so that whoever catches the cancellation can tell a
producer's cancel (end the job ``cancelled``) from a stopping worker's (hand it back).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass(slots=True)
class Control:
    #: On the event loop's clock (``loop.time()``); None: no deadline.
    deadline: float | None = None
    cancelled: bool = False

    def expire_in(self, seconds: float) -> None:
        self.deadline = asyncio.get_running_loop().time() + seconds

    def left_s(self) -> float | None:
        """Seconds to the deadline (negative: passed); None: no deadline."""
        if self.deadline is None:
            return None
        return self.deadline - asyncio.get_running_loop().time()

    def expired(self) -> bool:
        return self.deadline is not None and asyncio.get_running_loop().time() >= self.deadline

    def swallow_cancel(self) -> bool:
        """True (and the task's cancellation undone) when this cancellation is the
        producer's cancel: the caller then ends the job ``cancelled`` instead of
        letting the cancellation through."""
        if not self.cancelled:
            return False
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        return True
