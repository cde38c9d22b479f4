"""Daily spend per chain, shared by every worker, and the budget that caps it.

Before a cloud call of a chain with a budget, the worker *holds* the call's worst
case (its prompt at full input price, plus ``max_tokens`` of output) against the
day's spend; after the call it settles the hold to what the call really cost.
A call is admitted while ``spent + held < budget``, so the day ends at most one
call's worst case above its budget, however many workers run: every admitted
call was covered by the room left when it was admitted. A call that finds the
room held by calls in flight waits for them to settle (``budget_wait``) rather
than being skipped: they usually cost a small part of what they hold. Only a
budget really spent skips a call at once.

Holds carry an expiry (the call's deadline plus a margin), so a worker killed in
mid-call does not keep its hold for the rest of the day. Local models are never
held back: a budget only ever skips the cloud.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from llm_router.client.keys import holds_key, spend_key
from llm_router.client.spend import SPEND_TTL_S, to_nusd, to_usd, utc_day
from llm_router.worker.costs import Usage
from llm_router.worker.lua import script
from llm_router.worker.settings import ModelConfig

log = structlog.get_logger("llm_router.budgets")

#: A hold outlives its call's deadline by this long before it is dropped as stale.
HOLD_MARGIN_S = 30.0
#: While calls in flight hold the room left, look again this often.
RECHECK_S = 0.1

# Hold a call's worst cost against its chain's budget; settle: release the hold, count
# what the call used. KEYS, ARGV and returns: see the files.
_HOLD_LUA = script("budget_hold.lua")
_SETTLE_LUA = script("budget_settle.lua")


@dataclass(frozen=True, slots=True)
class Hold:
    """What one call holds against its chain's budget; ``member`` None: nothing held."""

    day: str
    chain: str
    nusd: int = 0
    member: str | None = None


def budget_reason(chain: str, day: str, spent: int, held: int, budget: int) -> str:
    detail = f" (${to_usd(held):.4f} more held by calls in flight)" if held else ""
    return (
        f"budget: chain {chain!r} has spent ${to_usd(spent):.4f} of its "
        f"${to_usd(budget):.4f} for {day} (UTC){detail}"
    )


class Ledger:
    """Holds and settles calls; counts every call's tokens and cost per model and chain.

    Without Redis (a :class:`~llm_router.worker.router.Router` used in-process) the
    same rules hold within the process.
    """

    def __init__(
        self,
        redis: Redis | None,
        budgets: dict[str, float],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.budgets = {chain: to_nusd(usd) for chain, usd in budgets.items()}
        self.clock = clock
        self.local: Counter[str] = Counter()
        self._local_holds: dict[str, tuple[str, int]] = {}
        if redis is not None:
            self._hold = redis.register_script(_HOLD_LUA)
            self._settle = redis.register_script(_SETTLE_LUA)

    def capped(self, chain: str, cfg: ModelConfig) -> bool:
        return not cfg.is_local and chain in self.budgets

    async def hold(
        self,
        chain: str,
        cfg: ModelConfig,
        worst_usd: float,
        *,
        wait_s: float = 0.0,
        hold_s: float | None = None,
    ) -> Hold | str:
        """Room for this call's worst case, or the ``budget: ...`` reason to skip it.

        While the budget is not spent but calls in flight hold the rest, wait up to
        ``wait_s`` for them to settle. If Redis does not answer, the call goes ahead
        unheld: Redis being away stops new jobs anyway. ``hold_s``: how long the hold
        lasts unsettled (default: the call's deadline; a parked job's lasts until its
        batch must have ended).
        """
        if not self.capped(chain, cfg):
            return Hold(utc_day(self.clock()), chain)
        budget = self.budgets[chain]
        nusd = max(1, to_nusd(worst_usd))
        give_up = time.monotonic() + wait_s
        while True:
            now = self.clock()
            day = utc_day(now)
            member = f"{chain}|{nusd}|{uuid.uuid4().hex}"
            lasts = hold_s if hold_s is not None else cfg.timeout + cfg.max_wait
            expiry = now + lasts + HOLD_MARGIN_S
            if self.redis is None:
                admitted, spent, held = self._hold_locally(day, chain, nusd, budget, member)
            else:
                keys = [spend_key(day), holds_key(day)]
                args: list[str | int | float] = [
                    now, chain, nusd, budget, member, expiry, SPEND_TTL_S
                ]  # fmt: skip
                try:
                    admitted, spent, held = await self._hold(keys=keys, args=args)
                except (RedisError, OSError) as exc:
                    log.warning("budget_unchecked", chain=chain, error=type(exc).__name__)
                    return Hold(day, chain)
            if admitted:
                return Hold(day, chain, nusd, member)
            if int(spent) >= budget or time.monotonic() + RECHECK_S > give_up:
                return budget_reason(chain, day, int(spent), int(held), budget)
            await asyncio.sleep(RECHECK_S)

    async def settle(self, hold: Hold, cfg: ModelConfig, usage: Usage | None) -> None:
        """Release the hold and count what the call used (nothing if it never answered)."""
        if hold.member is None and usage is None:
            return
        if self.redis is None:
            self._settle_locally(hold, cfg, usage)
            return
        args: list[str | int] = [hold.chain, cfg.model, hold.member or "", hold.nusd, SPEND_TTL_S]
        if usage is not None:
            args += [
                to_nusd(usage.cost_usd),
                usage.input_tokens,
                usage.output_tokens,
                usage.cache_read_input_tokens,
                usage.cache_creation_input_tokens,
            ]
        try:
            await self._settle(keys=[spend_key(hold.day), holds_key(hold.day)], args=args)
        except (RedisError, OSError) as exc:
            # The hold expires by itself; the call's cost is in its attempt and event.
            log.warning(
                "spend_uncounted",
                chain=hold.chain,
                model=cfg.model,
                cost_usd=usage.cost_usd if usage else 0.0,
                error=type(exc).__name__,
            )

    def _hold_locally(
        self, day: str, chain: str, nusd: int, budget: int, member: str
    ) -> tuple[int, int, int]:
        prefix = f"{day}|chain|{chain}|"
        spent, held = self.local[prefix + "spent_nusd"], self.local[prefix + "reserved_nusd"]
        if spent + held >= budget:
            return 0, spent, held
        self.local[prefix + "reserved_nusd"] += nusd
        self._local_holds[member] = (prefix, nusd)
        return 1, spent, held

    def _settle_locally(self, hold: Hold, cfg: ModelConfig, usage: Usage | None) -> None:
        if hold.member is not None and (found := self._local_holds.pop(hold.member, None)):
            self.local[found[0] + "reserved_nusd"] -= found[1]
        if usage is None:
            return
        chain, model = f"{hold.day}|chain|{hold.chain}|", f"{hold.day}|model|{cfg.model}|"
        cost = to_nusd(usage.cost_usd)
        self.local.update(
            {
                chain + "spent_nusd": cost,
                chain + "calls": 1,
                model + "cost_nusd": cost,
                model + "calls": 1,
                model + "input_tokens": usage.input_tokens,
                model + "output_tokens": usage.output_tokens,
                model + "cache_read_input_tokens": usage.cache_read_input_tokens,
                model + "cache_creation_input_tokens": usage.cache_creation_input_tokens,
            }
        )
