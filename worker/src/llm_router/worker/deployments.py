"""A chain step over several servers of one model: which one takes the next call.

A model with ``deployments`` (the desktop's GPU beside piha's Ollama) is one step of its
chain. Per call the step takes a server whose breaker lets the call through and that has
a free slot: the least busy first (calls this process has in flight there over its
``max_in_flight``, or over its ``weight`` when it has no limit), servers equally busy in
random order weighted by ``weight``. When every admitted server is full it waits, up to
the model's ``max_wait``, in every one's line at once (shared in Redis with every worker,
interactive waiters ahead of batch ones) and takes the first slot that comes. Breaker,
slots, warm-up and window are each server's own: the step only chooses.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from llm_router.worker.breaker import Admission, Breakers
from llm_router.worker.capacity import Busy, Capacity, Slot
from llm_router.worker.settings import ModelConfig


@dataclass(frozen=True, slots=True)
class Chosen:
    """The server a call goes to, with its slot (None: no limit) and whether it is the
    breaker's probe."""

    cfg: ModelConfig
    slot: Slot | None
    probe: bool


@dataclass(frozen=True, slots=True)
class NoServer:
    """No server took the call: why, for the ``skipped`` attempt."""

    reason: str


class Deployments:
    """The servers of every step, and the calls this process has in flight at each."""

    def __init__(self, breakers: Breakers, capacity: Capacity) -> None:
        self.breakers = breakers
        self.capacity = capacity
        self.running: Counter[str] = Counter()
        self._servers: dict[int, list[tuple[ModelConfig, float]]] = {}

    def servers(self, step: ModelConfig) -> list[tuple[ModelConfig, float]]:
        found = self._servers.get(id(step))
        if found is None:
            found = self._servers[id(step)] = step.deployed()
        return found

    def every_server(self, steps: Iterable[ModelConfig]) -> list[ModelConfig]:
        return [cfg for step in steps for cfg, _ in self.servers(step)]

    def order(self, servers: list[tuple[ModelConfig, float]]) -> list[ModelConfig]:
        """Least busy first; equally busy ones shuffled, each weighted by its weight
        (Efraimidis-Spirakis: sort by U ** (1 / weight), largest first)."""

        def key(entry: tuple[ModelConfig, float]) -> tuple[float, float]:
            cfg, weight = entry
            busy = self.running[cfg.endpoint] / (cfg.max_in_flight or weight)
            return busy, -(random.random() ** (1.0 / weight))

        return [cfg for cfg, _ in sorted(servers, key=key)]

    async def choose(
        self, servers: list[ModelConfig], *, batch: bool, max_wait: float
    ) -> Chosen | NoServer:
        """A server admitted by its breaker with a slot; else why none."""
        admitted: list[tuple[ModelConfig, Admission]] = []
        skipped: list[str] = []
        for cfg in servers:
            admission = await self.breakers.admit(cfg)
            if admission.skip_reason is not None:
                skipped.append(admission.skip_reason)
                continue
            admitted.append((cfg, admission))
        if not admitted:
            return NoServer(_summary(skipped, len(servers)))
        if len(servers) == 1:  # one server: its own line, as without deployments
            cfg, admission = admitted[0]
            slot = await self.capacity.acquire(cfg, batch=batch)
            if isinstance(slot, Busy):
                await self.breakers.record(cfg, "abandoned", probe=admission.probe)
                return NoServer(slot.reason)
            return Chosen(cfg, slot, admission.probe)
        full: list[tuple[ModelConfig, Admission]] = []
        for cfg, admission in admitted:  # a free slot now, in order
            slot = await self.capacity.acquire(cfg.model_copy(update={"max_wait": 0.0}))
            if not isinstance(slot, Busy):
                await self._give_up(admitted, but=cfg)
                return Chosen(cfg, slot, admission.probe)
            full.append((cfg, admission))
        chosen = await self._first_slot(full, batch=batch, max_wait=max_wait)
        if isinstance(chosen, NoServer):
            await self._give_up(full)
        return chosen

    async def _first_slot(
        self, full: list[tuple[ModelConfig, Admission]], *, batch: bool, max_wait: float
    ) -> Chosen | NoServer:
        """Wait in every full server's line at once; the first slot wins, the others'
        places (and any slot that came at the same moment) are given back."""
        waits = {
            asyncio.create_task(
                self.capacity.acquire(cfg.model_copy(update={"max_wait": max_wait}), batch=batch)
            ): (cfg, admission)
            for cfg, admission in full
        }
        won: Chosen | None = None
        reasons: list[str] = []
        try:
            pending = set(waits)
            while pending and won is None:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    got = task.result()
                    cfg, admission = waits[task]
                    if isinstance(got, Busy):
                        reasons.append(got.reason)
                    elif won is None:
                        won = Chosen(cfg, got, admission.probe)
        finally:
            for task in waits:
                task.cancel()  # a cancelled wait leaves its line (capacity.acquire)
            ended = await asyncio.gather(*waits, return_exceptions=True)
            for late in ended:  # slots that came at the same moment as the winner's
                if isinstance(late, Slot) and (won is None or late is not won.slot):
                    await self.capacity.release(late)
        if won is not None:
            await self._give_up(full, but=won.cfg)
            return won
        return NoServer(f"busy: all {len(full)} deployments full; " + reasons[0])

    async def _give_up(
        self, admitted: list[tuple[ModelConfig, Admission]], but: ModelConfig | None = None
    ) -> None:
        """A probe that will not be sent is given back, so another call may probe."""
        for cfg, admission in admitted:
            if cfg is not but and admission.probe:
                await self.breakers.record(cfg, "abandoned", probe=True)


def _summary(reasons: list[str], servers: int) -> str:
    if servers == 1:
        return reasons[0]
    return f"all {servers} deployments skipped; " + reasons[0]
