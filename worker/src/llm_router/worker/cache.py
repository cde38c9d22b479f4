"""The exact response cache: an ``ok`` answer kept under a hash of everything that shaped it,
so that the same request asked again costs no model call.

Opt-in: a request's ``cache_ttl`` (protocol version 3), else its chain's default (the
``cache_ttl`` setting), else nothing is looked up or stored. The key covers the chain's
name, its models as configured (names and the parameters that change an answer), the
messages and the schema; never labels such as ``context`` or ``metadata``, which a
caller changes without changing the question. Entries are JSON strings with a time to
live (never pickle), shared by every worker, and so is the hash that counts lookups.

Redis never fails a job here: a lookup that fails is a miss, a store that fails is
logged. Without Redis (an in-process :class:`~llm_router.worker.router.Router`) the
station does nothing.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from llm_router.client.keys import CACHE_STATS_KEY, cache_key
from llm_router.client.protocol import RouteRequest, RouteResult, encode
from llm_router.client.schemas import canonical_json
from llm_router.worker.lua import script
from llm_router.worker.offload import Offload
from llm_router.worker.settings import ModelConfig

log = structlog.get_logger("llm_router.cache")

#: Part of every key: a release that changes what the key covers or what an entry holds
#: raises it, so old entries are never misread (they lapse by their TTL).
KEY_FORMAT = 1
#: Messages longer than this (characters of text) are hashed in the checks thread.
INLINE_CHARS = 65_536
#: Of a result, what an entry keeps: enough to answer, nothing about the job that asked.
STORED = frozenset({"v", "status", "content", "raw_text", "model_used", "chain", "cost_usd"})

# GET the entry, judge its age on Redis' clock, count a hit or a miss: KEYS, ARGV and
# returns in the file.
_GET_LUA = script("cache_get.lua")


def models_fingerprint(models: Sequence[ModelConfig]) -> list[dict[str, Any]]:
    """What of a chain's models changes an answer: which model, its parameters, how the
    schema is sent. Not timeouts, keys, servers, slots or breakers: those change whether
    an answer comes, not which."""
    return [
        {
            "model": m.model,
            "params": m.params,
            "structured_output": m.structured_output,
            "deployments": [d.params for d in m.deployments],
        }
        for m in models
    ]


def key_material(chain: str, models: Sequence[ModelConfig], request: RouteRequest) -> bytes:
    """The canonical JSON (sorted keys, compact) the key is the hash of."""
    material = {
        "format": KEY_FORMAT,
        "chain": chain,
        "models": models_fingerprint(models),
        "messages": [m.model_dump(mode="json") for m in request.messages],
        "schema": request.json_schema,
    }
    # default=str: an odd model param (a TOML date) names itself rather than fail the job.
    return canonical_json(material, default=str).encode("utf-8", "backslashreplace")


def entry_key(chain: str, models: Sequence[ModelConfig], request: RouteRequest) -> str:
    """``llm_router:cache:<sha256 of the key material>``."""
    return cache_key(hashlib.sha256(key_material(chain, models, request)).hexdigest())


def entry_blob(result: RouteResult, ttl: int) -> bytes:
    """The stored JSON: ``kept_ms`` first (the lookup script reads it there), then the
    result's answering fields; ``raw_text`` only when it differs from a text ``content``."""
    fields = result.model_dump(mode="json", include=set(STORED))
    if fields.get("raw_text") == fields.get("content"):
        del fields["raw_text"]
    return encode({"kept_ms": ttl * 1000, **fields})


def entry_result(blob: bytes | str) -> RouteResult:
    """An entry read back; raises ``ValueError`` for one that is not."""
    data = json.loads(blob)
    if not isinstance(data, dict) or data.get("status") != "ok":
        raise ValueError("not a cached ok result")
    if "raw_text" not in data and isinstance(data.get("content"), str):
        data["raw_text"] = data["content"]
    return RouteResult.model_validate(data)


def _text_size(request: RouteRequest) -> int:
    """Characters of text in the messages, or -1 when they hold content blocks."""
    total = 0
    for message in request.messages:
        if not isinstance(message.content, str):
            return -1
        total += len(message.content)
    return total


class Entry(NamedTuple):
    """Where a request's answer is kept, and for how long (seconds)."""

    key: str
    ttl: int


class ResponseCache:
    """Looks requests up and stores ``ok`` answers in Redis; with no Redis, does nothing.

    ``defaults``: each chain's ``cache_ttl`` (the setting); ``offload``: where a large
    request is hashed, off the event loop.
    """

    def __init__(
        self,
        redis: Redis | None,
        *,
        defaults: Mapping[str, int] | None = None,
        offload: Offload | None = None,
    ) -> None:
        self.redis = redis
        self.defaults = dict(defaults or {})
        self.offload = offload
        if redis is not None:
            self._get_script = redis.register_script(_GET_LUA)

    def ttl(self, request: RouteRequest) -> int:
        """Seconds this request's answer may come from, and go into, the cache; 0: not at
        all. The request's own ``cache_ttl`` wins over its chain's default (so 0 turns that
        off)."""
        if request.cache_ttl is not None:
            return request.cache_ttl
        return self.defaults.get(request.chain or "", 0)

    async def entry(
        self, request: RouteRequest, chains: Mapping[str, Sequence[ModelConfig]]
    ) -> Entry | None:
        """The request's entry; None when it is not to be cached (its ttl is 0, there is no
        Redis, or the chain is one this worker does not have: the walk refuses that)."""
        ttl = self.ttl(request)
        chain = request.chain or ""
        models = chains.get(chain)
        if ttl <= 0 or self.redis is None or models is None:
            return None
        size = _text_size(request)
        if self.offload is not None and (size < 0 or size > INLINE_CHARS):
            return Entry(await self.offload.run(entry_key, chain, models, request), ttl)
        return Entry(entry_key(chain, models, request), ttl)

    async def get(self, entry: Entry, job_id: str | None = None) -> RouteResult | None:
        """The stored result, if one no older than the entry's ttl is kept; None for a
        miss, also when Redis fails or the entry cannot be read."""
        if self.redis is None:
            return None
        keys = [entry.key, CACHE_STATS_KEY]
        try:
            found = await self._get_script(keys=keys, args=[entry.ttl * 1000])
        except (RedisError, OSError) as exc:
            log.warning("cache_lookup_failed", job_id=job_id, error=type(exc).__name__)
            return None
        if not found:
            return None
        blob, age_ms = found
        try:
            stored = entry_result(blob)
        except ValueError as exc:  # pydantic's ValidationError is one
            log.warning("cache_entry_unreadable", key=entry.key, error=type(exc).__name__)
            return None
        log.info("cache_hit", job_id=job_id, model_used=stored.model_used, age_s=int(age_ms) / 1000)
        return stored

    async def answer(
        self, entry: Entry | None, request: RouteRequest, job_id: str | None
    ) -> RouteResult | None:
        """This job's result from the cache: the stored answer, this request's labels,
        no attempts (nothing was tried) and nothing spent; None when it must be routed."""
        if entry is None:
            return None
        start = time.monotonic()
        stored = await self.get(entry, job_id)
        if stored is None:
            return None
        return RouteResult(
            status="ok",
            content=stored.content,
            raw_text=stored.raw_text,
            model_used=stored.model_used,
            latency_ms=round((time.monotonic() - start) * 1000),
            job_id=job_id,
            context=request.context,
            chain=request.chain,
            metadata=request.metadata,
            cost_usd=0.0,
            cached=True,
        )

    async def put(self, entry: Entry | None, result: RouteResult) -> bool:
        """Keep an ``ok`` answer for the entry's ttl (the newest replaces an older one);
        anything else, or an answer that itself came from the cache, is not kept. Returns
        whether it was stored; a failure is logged, never raised."""
        if entry is None or self.redis is None or not result.ok or result.cached:
            return False
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(entry.key, entry_blob(result, entry.ttl), ex=entry.ttl)
                pipe.hincrby(CACHE_STATS_KEY, "stores", 1)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning(
                "cache_store_failed",
                job_id=result.job_id,
                chain=result.chain,
                error=type(exc).__name__,
            )
            return False
        return True
