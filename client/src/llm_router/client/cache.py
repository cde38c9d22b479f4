"""The response cache seen from outside (``llm-router cache``): its counters, its entries,
and emptying it.

The workers keep the entries (``llm_router:cache:<sha256>``) and count every lookup in
one hash (``llm_router:cache:stats``); this module only reads them, and deletes entries
on request. Entries are found with ``SCAN`` (never ``KEYS``, which would stop Redis
for as long as it walks every key), and deleted with ``UNLINK`` in batches, so that a
large cache is emptied without a long pause of the server.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from llm_router.client.counters import field_count
from llm_router.client.keys import CACHE_MATCH, CACHE_STATS_KEY

#: Keys asked for per SCAN call, and deleted per UNLINK.
SCAN_COUNT = 1000


@dataclass(frozen=True)
class CacheStats:
    """The shared counters of the response cache, and how many entries it holds."""

    hits: int = 0
    misses: int = 0
    stores: int = 0
    #: Entries now in Redis (None: not counted).
    entries: int | None = None

    @property
    def hit_ratio(self) -> float | None:
        """Hits of all lookups; None before any."""
        looked = self.hits + self.misses
        return self.hits / looked if looked else None

    def as_json(self) -> dict[str, Any]:
        return {
            "entries": self.entries,
            "hits": self.hits,
            "misses": self.misses,
            "stores": self.stores,
            "hit_ratio": self.hit_ratio,
        }


def parse_stats(raw: Mapping[Any, Any], entries: int | None = None) -> CacheStats:
    """The stats hash as ``HGETALL`` gives it; a field that is not an integer counts 0."""
    return CacheStats(
        hits=field_count(raw, "hits"),
        misses=field_count(raw, "misses"),
        stores=field_count(raw, "stores"),
        entries=entries,
    )


async def count_entries(redis: Redis) -> int:
    """Entries in the cache now, by SCAN (a walk of the keyspace in small steps)."""
    return sum([1 async for _ in redis.scan_iter(match=CACHE_MATCH, count=SCAN_COUNT)])


async def read_stats(redis: Redis) -> CacheStats:
    """The counters and the number of entries; raises for Redis being away."""
    raw: dict[Any, Any] = await redis.hgetall(CACHE_STATS_KEY)  # type: ignore[misc]
    return parse_stats(raw, await count_entries(redis))


async def purge(redis: Redis, batch: int = SCAN_COUNT) -> int:
    """Delete every entry (not the counters); return how many were deleted. Workers may
    store new ones meanwhile: those may stay."""
    deleted = 0
    pending: list[bytes | str] = []
    async for key in redis.scan_iter(match=CACHE_MATCH, count=SCAN_COUNT):
        pending.append(key)
        if len(pending) >= batch:
            deleted += int(await redis.unlink(*pending))
            pending = []
    if pending:
        deleted += int(await redis.unlink(*pending))
    return deleted
