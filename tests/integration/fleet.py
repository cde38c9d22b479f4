"""A set of worker processes on one queue, for tests that kill and replace them."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

from redis.asyncio import Redis

from tests.integration.conftest import WorkerProcess, worker_env


class Fleet:
    """Workers sharing a queue; replaces the ones a test kills."""

    def __init__(self, directory: Path, redis_url: str, **settings: str) -> None:
        self.directory = directory
        self.queue = f"llm_router:test:fleet:{uuid.uuid4().hex[:6]}"
        self.env = worker_env(redis_url=redis_url, queue_name=self.queue, **settings)
        self.workers: list[WorkerProcess] = []
        self._count = 0

    def spawn(self, n: int = 1, *, wait: bool = True) -> list[WorkerProcess]:
        new = []
        for _ in range(n):
            self._count += 1
            log = self.directory / f"worker-{self._count}.log"
            new.append(WorkerProcess(self.env, log).launch())
        self.workers += new
        if wait:
            for worker in new:
                worker.wait_ready()
        return new

    @property
    def alive(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.alive]

    def by_id(self, worker_id: str) -> WorkerProcess:
        for worker in self.workers:
            if worker.worker_id == worker_id:
                return worker
        raise LookupError(worker_id)

    def stop(self) -> None:
        for worker in self.workers:
            if worker.alive:
                worker.stop()

    def routed(self, job_id: str) -> list[WorkerProcess]:
        """The workers that logged finishing this job's chain."""
        return [w for w in self.workers for r in w.events("routed") if r.get("job_id") == job_id]


async def lease_holder(redis: Redis, job_id: str) -> str | None:
    value = await redis.get(f"arq:in-progress:{job_id}")
    return value.decode() if value is not None else None


async def wait_for_holder(
    redis: Redis, job_id: str, *, other_than: str | None = None, timeout: float = 30.0
) -> tuple[str, float]:
    """Wait until a worker (other than ``other_than``) holds the job's lease."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        holder = await lease_holder(redis, job_id)
        if holder is not None and holder != other_than:
            return holder, time.monotonic() - started
        await asyncio.sleep(0.02)
    raise TimeoutError(f"no worker took job {job_id} within {timeout}s")
