"""How many calls a model may have in flight across every worker: slots leased in Redis.

Ollama serves one request at a time by default; twenty concurrent jobs would put
twenty requests in its queue, most of them to run out their deadline there and go
to the cloud. A model with ``max_in_flight`` has that many slots, shared by every
worker process and host. A job holds a slot for its call (the model's timeout runs
from then), waits up to ``max_wait`` for one, first come first served, or moves on
down the chain (attempt ``skipped``, reason ``busy …``). When the wait it can
expect (jobs ahead times the model's recent median call, over its slots) is longer
than ``max_wait``, it moves on at once. Batch work waits behind every interactive
waiter (its places in line are numbered after theirs), so a backfill delays an
interactive call by at most the calls already running.

Slots and places in line are leases: a worker that dies frees its slots within
the slot's lease (the model's timeout plus a few seconds; a call never takes
longer) and its places in line within :data:`WAITER_TTL_S`. A release pushes a
wake-up to the process of each waiter now at the head of the line, whose one
listener task wakes that waiter: no polling, except a slow safety net.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import statistics
import time
import uuid
from collections import deque
from dataclasses import dataclass

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from llm_router.client.keys import CAPACITY_PREFIX
from llm_router.worker.lua import script
from llm_router.worker.settings import ModelConfig

log = structlog.get_logger("llm_router.capacity")

#: A place in line lapses this long after its waiter last looked (it looks at least
#: every :data:`SAFETY_POLL_S`).
WAITER_TTL_S = 3.0
SAFETY_POLL_S = 0.5
#: Beyond the model's timeout, how long a slot outlives the call that took it.
LEASE_MARGIN_S = 5.0
#: Calls remembered per model for the median call time.
RECENT_CALLS = 50
#: Added to a batch waiter's ticket, so that every interactive waiter ranks ahead of it
#: (exact in Redis's double scores for 2**53 - 10**12 tickets).
BATCH_TICKET_OFFSET = 10**12

# Both scripts first drop lapsed slots and places in line. Acquire takes a slot or a
# place in line; release gives one back and wakes the waiters now at the head. KEYS,
# ARGV and returns: see the files.
_ACQUIRE = script("capacity_acquire.lua")
_RELEASE = script("capacity_release.lua")


def keys(model: str) -> list[str]:
    """holders, line, alive, ticket counter."""
    base = f"{CAPACITY_PREFIX}{model}:"
    return [base + "holders", base + "line", base + "alive", base + "tickets"]


@dataclass(frozen=True, slots=True)
class Busy:
    """No slot in time: why, for the ``skipped`` attempt."""

    reason: str


class Slot:
    """One held slot; give it back with :meth:`Capacity.release`."""

    def __init__(self, cfg: ModelConfig, token: str, waited: float) -> None:
        self.cfg = cfg
        self.token = token
        self.waited = waited
        self.started = time.monotonic()


class Capacity:
    """The slots of every model that has ``max_in_flight``, for one worker process.

    Without Redis (an in-process :class:`~llm_router.worker.router.Router` made
    without one) the limit holds within this process only.
    """

    def __init__(self, redis: Redis | None) -> None:
        self.redis = redis
        self.process = uuid.uuid4().hex
        self.wake_list = f"{CAPACITY_PREFIX}wake:{self.process}"
        self._numbers = itertools.count()
        self._waiting: dict[str, asyncio.Event] = {}
        self._listener: asyncio.Task[None] | None = None
        self._recent: dict[str, deque[float]] = {}
        self._local: dict[str, asyncio.Semaphore] = {}
        if redis is not None:
            self._acquire = redis.register_script(_ACQUIRE)
            self._release = redis.register_script(_RELEASE)

    def median_call(self, endpoint: str) -> float | None:
        recent = self._recent.get(endpoint)
        return statistics.median(recent) if recent else None

    async def acquire(self, cfg: ModelConfig, *, batch: bool = False) -> Slot | Busy | None:
        """A slot, :class:`Busy`, or None when the model has no limit; ``batch`` work
        waits behind interactive work."""
        if cfg.max_in_flight is None:
            return None
        if self.redis is None:
            return await self._acquire_locally(cfg)
        token = f"{self.process}:{next(self._numbers)}"
        started = time.monotonic()
        deadline = started + cfg.max_wait
        wake = self._waiting[token] = asyncio.Event()
        try:
            while True:
                wake.clear()
                got, ahead, _ = await self._acquire(
                    keys=keys(cfg.endpoint),
                    args=[
                        cfg.max_in_flight,
                        token,
                        self._lease_ms(cfg),
                        int(WAITER_TTL_S * 1000),
                        BATCH_TICKET_OFFSET if batch else 0,
                    ],
                )
                now = time.monotonic()
                if got:
                    return Slot(cfg, token, now - started)
                left = deadline - now
                median = self.median_call(cfg.endpoint)
                expected = (ahead + 1) * median / cfg.max_in_flight if median else 0.0
                if left <= 0 or expected > left:
                    await self._give_back(cfg, token)
                    return Busy(self._busy_reason(cfg, now - started, ahead, expected))
                self._listen()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(left, SAFETY_POLL_S)):
                        await wake.wait()
        except BaseException:
            with contextlib.suppress(RedisError, OSError):
                await self._give_back(cfg, token)
            raise
        finally:
            self._waiting.pop(token, None)

    async def release(self, slot: Slot) -> None:
        recent = self._recent.setdefault(slot.cfg.endpoint, deque(maxlen=RECENT_CALLS))
        recent.append(time.monotonic() - slot.started)
        if self.redis is None:
            self._local[slot.cfg.endpoint].release()
            return
        try:
            await self._give_back(slot.cfg, slot.token)
        except (RedisError, OSError) as exc:  # the lease lapses on its own
            log.warning("capacity_release_failed", model=slot.cfg.model, error=str(exc)[:200])

    async def aclose(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener

    # -- internals --------------------------------------------------------------------------

    @staticmethod
    def _lease_ms(cfg: ModelConfig) -> int:
        return int((cfg.timeout + LEASE_MARGIN_S) * 1000)

    @staticmethod
    def _busy_reason(cfg: ModelConfig, waited: float, ahead: int, expected: float) -> str:
        slots = f"{cfg.max_in_flight} slot{'s' if cfg.max_in_flight != 1 else ''}"
        if expected > 0 and waited < cfg.max_wait:
            return (
                f"busy: {ahead} ahead for {slots}, expected wait {expected:.1f}s > "
                f"max_wait {cfg.max_wait:g}s (waited {waited:.2f}s)"
            )
        return f"busy: waited {waited:.2f}s for {slots} (max_wait {cfg.max_wait:g}s)"

    async def _give_back(self, cfg: ModelConfig, token: str) -> None:
        slots = cfg.max_in_flight or 0
        await self._release(
            keys=keys(cfg.endpoint)[:3], args=[token, slots, f"{CAPACITY_PREFIX}wake:"]
        )

    def _listen(self) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.get_running_loop().create_task(
                self._wake_ups(), name="capacity wake-ups"
            )

    async def _wake_ups(self) -> None:
        """One BLPOP for all of this process's waiters; each push names one of them."""
        assert self.redis is not None
        while True:
            try:
                popped = await self.redis.blpop([self.wake_list], timeout=1)  # type: ignore[misc]
            except (RedisError, OSError):
                await asyncio.sleep(SAFETY_POLL_S)  # the waiters poll meanwhile
                continue
            if popped is not None:
                event = self._waiting.get(popped[1].decode())
                if event is not None:
                    event.set()

    async def _acquire_locally(self, cfg: ModelConfig) -> Slot | Busy:
        assert cfg.max_in_flight is not None
        gate = self._local.setdefault(cfg.endpoint, asyncio.Semaphore(cfg.max_in_flight))
        started = time.monotonic()
        try:
            async with asyncio.timeout(cfg.max_wait):
                await gate.acquire()
        except TimeoutError:
            return Busy(self._busy_reason(cfg, time.monotonic() - started, 0, 0.0))
        return Slot(cfg, "local", time.monotonic() - started)
