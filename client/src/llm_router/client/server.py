"""What llm-router needs of its Redis server: that it never evicts, keeps its data, and
has room.

A Redis whose ``maxmemory-policy`` is anything but ``noeviction`` may drop queued jobs
and results silently when it fills up; one that keeps nothing on disk loses every
queued job when it restarts; a full one refuses every write (``OOM``). Workers read
this at start-up and with each heartbeat (and say so in their log, heartbeat and
``/metrics``); ``llm-router health`` and ``status`` read it too, falling back to what
the workers' heartbeats say when their user may not run ``INFO``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

#: The only policy under which Redis never drops a key to make room.
SAFE_POLICY = "noeviction"
#: Memory used at or above this share of ``maxmemory`` is worth an alert.
HIGH_MEMORY_SHARE = 0.8


class RedisFull(OutOfMemoryError):
    """Redis refused a write: it is at its ``maxmemory`` (and will not evict). Nothing of
    the job was written; enqueue again once there is room."""


def refused_for_memory(exc: BaseException) -> bool:
    """Is this Redis' ``OOM`` refusal? Redis 7 and Valkey reply ``-OOM ...`` (redis-py's
    :class:`OutOfMemoryError`); Redis 6.2 wraps it when a script's write is refused
    (``Error running script ... -OOM command not allowed ...``)."""
    if isinstance(exc, OutOfMemoryError):
        return True
    return isinstance(exc, ResponseError) and "OOM command not allowed" in str(exc)


@dataclass(frozen=True)
class ServerState:
    """One look at the server; None where it could not be read (a user without ``INFO``
    or ``CONFIG``)."""

    version: str | None = None
    policy: str | None = None
    #: RDB save points or the AOF: a restart keeps what was queued.
    persistent: bool | None = None
    used_memory: int | None = None
    #: 0: no limit.
    maxmemory: int | None = None

    @property
    def full(self) -> bool:
        return bool(self.maxmemory) and (self.used_memory or 0) >= (self.maxmemory or 0)

    @property
    def evicts(self) -> bool:
        return self.policy is not None and self.policy != SAFE_POLICY

    @property
    def memory_share(self) -> float | None:
        if not self.maxmemory or self.used_memory is None:
            return None
        return self.used_memory / self.maxmemory

    def problems(self) -> list[str]:
        """What makes the server unfit (``health`` fails on these), one line each."""
        found = []
        if self.full:
            found.append(
                f"Redis is full: {_mb(self.used_memory)} used of maxmemory "
                f"{_mb(self.maxmemory)}; enqueues and results are refused until there is room"
            )
        if self.evicts:
            found.append(
                f"Redis may evict queued jobs and results: maxmemory-policy is {self.policy} "
                f"(set {SAFE_POLICY})"
            )
        return found

    def cautions(self) -> list[str]:
        """What is worth a warning but does not stop the service."""
        found = []
        if self.persistent is False:
            found.append("Redis keeps nothing on disk: a restart loses every queued job")
        share = self.memory_share
        if share is not None and share >= HIGH_MEMORY_SHARE and not self.full:
            found.append(f"Redis memory at {share:.0%} of maxmemory")
        return found

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> ServerState | None:
        if not isinstance(data, dict):
            return None
        known = {k: data.get(k) for k in ("version", "policy", "persistent", "used_memory")}
        return cls(**known, maxmemory=data.get("maxmemory"))


def best_known(state: ServerState, reports: list[Any]) -> ServerState:
    """``state`` where it says something, else the first report (a worker heartbeat's
    ``redis``) that does: a user without ``INFO`` still learns what workers saw."""
    if state.policy is not None or state.used_memory is not None:
        return state
    for report in reports:
        known = ServerState.from_dict(report)
        if known is not None and (known.policy is not None or known.used_memory is not None):
            return known
    return state


def summary(state: ServerState) -> str:
    """One line for ``status``."""
    if state.policy is None and state.used_memory is None:
        return "Redis: not readable by this user (INFO)"
    limit = "no limit" if not state.maxmemory else f"maxmemory {_mb(state.maxmemory)}"
    disk = {True: "persistence on", False: "persistence off", None: "persistence unknown"}
    return (
        f"Redis {state.version or '?'}: maxmemory-policy {state.policy or '?'}, "
        f"{disk[state.persistent]}, {_mb(state.used_memory)} used of {limit}"
    )


async def read_server(redis: Redis, *, config: bool = False) -> ServerState:
    """``INFO`` memory, persistence and server in one round trip; what the user may not
    read stays None. Raises only for Redis being away.

    Persistence is known from ``INFO`` when the AOF is on; RDB save points only with
    ``config`` (``CONFIG GET save``, for the operator's commands): the worker's ACL
    user is not given ``CONFIG``, which would also show it ``requirepass``.
    """
    async with redis.pipeline(transaction=False) as pipe:
        pipe.info("memory")
        pipe.info("persistence")
        pipe.info("server")
        if config:
            pipe.config_get("save")
        replies = await pipe.execute(raise_on_error=False)
    for reply in replies:
        if isinstance(reply, RedisConnectionError | RedisTimeoutError):
            raise reply
    memory, persistence, server, *rest = (r if isinstance(r, dict) else {} for r in replies)
    aof, saves = persistence.get("aof_enabled"), (rest[0].get("save") if rest else None)
    persistent: bool | None = None
    if aof in (1, "1"):
        persistent = True
    elif saves is not None:
        persistent = bool(str(saves).strip())
    return ServerState(
        version=_str(server.get("redis_version") or server.get("valkey_version")),
        policy=_str(memory.get("maxmemory_policy")),
        persistent=persistent,
        used_memory=_int(memory.get("used_memory")),
        maxmemory=_int(memory.get("maxmemory")),
    )


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def _int(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _mb(value: int | None) -> str:
    return "?" if value is None else f"{value / 1_048_576:,.1f} MB"
