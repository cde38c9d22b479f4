"""A circuit breaker per model, kept in Redis so that every worker agrees.

A local model that hangs costs every job its full deadline (8 s) before the
cloud is tried. After ``breaker_failures`` consecutive failures that say the
model is unwell (deadline passed, connection refused or reset, HTTP 5xx, 404
unknown model, 401/403) the breaker opens: the model is skipped (attempt
``skipped``, reason ``circuit open …``) for ``breaker_cooldown`` seconds. Then
one probe request at a time, across all workers, decides: an answer of any kind
(a refusal or an answer that fails the schema still says the model is up)
closes it, another unwell failure opens it again. A probe whose worker dies
lapses after the probe's lease and the next job probes.

A worker remembers until when a breaker it saw open stays open, so a skip costs
no Redis round trip; a closed breaker costs one (~0.2 ms), so a breaker one
worker opens is open for all at once, and a healthy call with no failures
counted writes nothing.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Literal

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from llm_router.client.keys import breaker_key
from llm_router.worker.lua import script
from llm_router.worker.settings import ModelConfig

log = structlog.get_logger("llm_router.breaker")

#: Beyond the model's wait and timeout, how long a probe may stay out before another
#: job probes instead.
PROBE_MARGIN_S = 5.0
#: A breaker nobody has written for a day is forgotten (closed): its model is long gone.
KEY_TTL_MS = 86_400_000
#: While another worker probes, look at the shared state again this often.
PROBING_RECHECK_S = 0.5

State = Literal["closed", "open", "half_open"]
Verdict = Literal["healthy", "unwell", "abandoned"]

# May a call go to the model; record a call's verdict. KEYS, ARGV and returns: see the
# files.
_ADMIT = script("breaker_admit.lua")
_RECORD = script("breaker_record.lua")


@dataclass(frozen=True, slots=True)
class Admission:
    """May this job call the model: ``skip_reason`` None means yes; ``probe`` means it
    is the one call that decides whether the breaker closes."""

    skip_reason: str | None = None
    probe: bool = False


class Breakers:
    """The breakers of every model, as this worker process sees and changes them."""

    def __init__(self, redis: Redis | None) -> None:
        self.redis = redis
        self.token = uuid.uuid4().hex
        self._open_until: dict[str, float] = {}  # endpoint -> monotonic time
        self._failures: dict[str, int] = {}  # as last seen in Redis
        self._local: dict[str, _LocalBreaker] = {}
        #: The last state this process saw per model (for the metrics event).
        self.seen: dict[str, State] = {}
        if redis is not None:
            self._admit = redis.register_script(_ADMIT)
            self._record = redis.register_script(_RECORD)

    async def admit(self, cfg: ModelConfig) -> Admission:
        until = self._open_until.get(cfg.endpoint)
        now = time.monotonic()
        if until is not None and now < until:
            return Admission(_skip_reason(until - now))
        if self.redis is None:
            return self._local.setdefault(cfg.endpoint, _LocalBreaker()).admit(cfg, self)
        try:
            decision, left_ms, changed = await self._admit(
                keys=[breaker_key(cfg.endpoint)],
                args=[self.token, int(cfg.breaker_cooldown * 1000), self._probe_ms(cfg)],
            )
        except (RedisError, OSError):  # no shared view: call the model as if closed
            return Admission()
        decision = decision.decode() if isinstance(decision, bytes) else decision
        if decision == "open":
            self._open_until[cfg.endpoint] = now + int(left_ms) / 1000
            self.seen[cfg.label] = "open"
            return Admission(_skip_reason(int(left_ms) / 1000))
        if decision == "probing":  # the probe may close it any moment: look again soon
            self._open_until[cfg.endpoint] = now + min(int(left_ms) / 1000, PROBING_RECHECK_S)
            self.seen[cfg.label] = "half_open"
            return Admission(_probing_reason())
        if decision == "probe":
            self.seen[cfg.label] = "half_open"
            if changed:
                log.info("breaker_half_open", model=cfg.label)
            return Admission(probe=True)
        self.seen[cfg.label] = "closed"
        self._failures[cfg.endpoint] = int(left_ms)
        return Admission()

    async def record(self, cfg: ModelConfig, verdict: Verdict, *, probe: bool) -> State | None:
        """Count one call's outcome; returns the new state when this call changed it."""
        if self.redis is None:
            changed = self._local.setdefault(cfg.endpoint, _LocalBreaker()).record(cfg, verdict)
        elif verdict == "healthy" and not probe and self._failures.get(cfg.endpoint, 0) == 0:
            return None  # nothing to reset
        elif verdict == "abandoned" and not probe:
            return None
        else:
            try:
                raw, failures = await self._record(
                    keys=[breaker_key(cfg.endpoint)],
                    args=[self.token, verdict, cfg.breaker_failures, KEY_TTL_MS],
                )
            except (RedisError, OSError):
                return None
            self._failures[cfg.endpoint] = int(failures)
            changed = (raw.decode() if isinstance(raw, bytes) else raw) or None
        if changed == "open":
            self._open_until[cfg.endpoint] = time.monotonic() + cfg.breaker_cooldown
            self.seen[cfg.label] = "open"
            log.warning("breaker_open", model=cfg.label, cooldown_s=cfg.breaker_cooldown)
            return "open"
        if changed == "closed":
            self._open_until.pop(cfg.endpoint, None)
            self.seen[cfg.label] = "closed"
            log.info("breaker_closed", model=cfg.label)
            return "closed"
        return None

    @staticmethod
    def _probe_ms(cfg: ModelConfig) -> int:
        return int((cfg.max_wait + cfg.timeout + PROBE_MARGIN_S) * 1000)


def _skip_reason(left: float) -> str:
    return f"circuit open: the model failed repeatedly; next try in {max(left, 0):.1f}s"


def _probing_reason() -> str:
    return "circuit open: half-open, another request is probing the model"


class _LocalBreaker:
    """The same rules within one process, for a Router made without Redis."""

    def __init__(self) -> None:
        self.state: State = "closed"
        self.failures = 0
        self.opened = 0.0
        self.probing = False

    def admit(self, cfg: ModelConfig, owner: Breakers) -> Admission:
        now = time.monotonic()
        if self.state == "open":
            if now < self.opened + cfg.breaker_cooldown:
                return Admission(_skip_reason(self.opened + cfg.breaker_cooldown - now))
            self.state, self.probing = "half_open", True
            owner.seen[cfg.label] = "half_open"
            log.info("breaker_half_open", model=cfg.label)
            return Admission(probe=True)
        if self.state == "half_open":
            if self.probing:
                return Admission(_probing_reason())
            self.probing = True
            return Admission(probe=True)
        return Admission()

    def record(self, cfg: ModelConfig, verdict: Verdict) -> str | None:
        if verdict == "abandoned":
            self.probing = False
            return None
        if verdict == "healthy":
            self.failures = 0
            if self.state == "half_open":
                self.state, self.probing = "closed", False
                return "closed"
            return None
        if self.state == "half_open":
            self.state, self.opened, self.probing = "open", time.monotonic(), False
            return "open"
        self.failures += 1
        if self.state == "closed" and self.failures >= cfg.breaker_failures:
            self.state, self.opened = "open", time.monotonic()
            return "open"
        return None
