"""The response cache: a hit's round trip beside a job the model answers, same worker, same run.

One producer, one job at a time, a stub model that answers at once, one worker. Variants,
measured in interleaved rounds:

* ``uncached``  no ``cache_ttl``: nothing looked up, the model called (the plain queue path);
* ``hit``       the same request every time with ``cache_ttl``, primed once: answered from
                the cache, no model call;
* ``miss``      a new request every time with ``cache_ttl``: the lookup, the model, the store.

total = enqueue -> result in the producer's hands. A hit skips the model call (here a
loopback HTTP request and litellm's work around it) but not the queue, so what it saves is
the chain's time; what a miss adds is the lookup and the store.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from bench.common import (
    JOB_TIMEOUT_S,
    MODEL,
    PROMPT,
    Measure,
    Samples,
    chains_json,
    forget_jobs,
    forget_keys,
    note,
    queue_keys,
    ratio,
    say,
    shares,
    summary,
    table,
    timed_jobs,
)
from bench.procs import Managed, probe_ours, start_ours, wait_listening
from llm_router.client import RouterClient
from llm_router.client.client import build_request
from llm_router.client.counters import CACHE_HITS_FIELD
from llm_router.client.keys import CACHE_STATS_KEY, COUNTED_PREFIX, METRICS_COUNTERS_KEY
from llm_router.worker.cache import entry_key
from llm_router.worker.settings import ModelConfig

VARIANTS = ("uncached", "hit", "miss")
TTL_S = 3600


@dataclass
class CacheConfig:
    redis_url: str
    jobs: int = 500
    warmup: int = 20
    rounds: int = 5


def _measure(
    client: RouterClient, prompt: Callable[[], str], ttl: int | None, cached: bool
) -> Measure:
    async def measure(ids: list[str]) -> tuple[float, float]:
        text = prompt()
        t0 = time.perf_counter()
        handle = await client.enqueue(text, cache_ttl=ttl)
        ids.append(handle.job_id)
        result = await handle.result(timeout=JOB_TIMEOUT_S)
        total = (time.perf_counter() - t0) * 1000
        if result.cached is not cached:
            raise RuntimeError(f"cached={result.cached}, expected {cached}")
        return total, result.chain_ms

    return measure


def _entry_keys(chains: str, prompts: list[str]) -> list[str]:
    """The keys the worker stored these prompts under (its key recipe, computed here)."""
    models = [ModelConfig.model_validate(m) for m in json.loads(chains)["default"]]
    keys = []
    for text in prompts:
        request = build_request(text, chain="default", cache_ttl=TTL_S)
        keys.append(entry_key("default", models, request))
    return keys


async def _forget_hits(redis: Redis, job_ids: list[str]) -> None:
    """Hits were counted as ``cache_hits``, not as a model's success: take those back."""
    counted = 0
    for start in range(0, len(job_ids), 500):
        chunk = job_ids[start : start + 500]
        counted += int(await redis.exists(*(COUNTED_PREFIX + j for j in chunk)))
    if counted:
        left = await redis.hincrby(METRICS_COUNTERS_KEY, CACHE_HITS_FIELD, -counted)  # type: ignore[misc]
        if left <= 0:
            await redis.hdel(METRICS_COUNTERS_KEY, CACHE_HITS_FIELD)  # type: ignore[misc]
    prefixes = ("arq:result:", "arq:job:", "arq:in-progress:", "arq:retry:", COUNTED_PREFIX)
    for start in range(0, len(job_ids), 500):
        chunk = job_ids[start : start + 500]
        await redis.delete(*(p + j for j in chunk for p in prefixes))


async def run(cfg: CacheConfig, stub_url: str, run_id: str) -> dict[str, Any]:
    chains = chains_json(stub_url)
    queue = f"bench:{run_id}:cache"
    redis = Redis.from_url(cfg.redis_url)
    client = RouterClient(cfg.redis_url, queue_name=queue)
    stats_before: dict[Any, Any] = await redis.hgetall(CACHE_STATS_KEY)
    hit_prompt = f"{PROMPT} (cache bench {run_id}: the same every time)"
    miss_prompts: list[str] = []

    def next_miss() -> str:
        miss_prompts.append(f"{PROMPT} (cache bench {run_id}: miss {len(miss_prompts)})")
        return miss_prompts[-1]

    measures: dict[str, Measure] = {
        "uncached": _measure(client, lambda: f"{PROMPT} (cache bench {run_id})", None, False),
        "hit": _measure(client, lambda: hit_prompt, TTL_S, True),
        "miss": _measure(client, next_miss, TTL_S, False),
    }
    warm = Samples()  # the probe and the priming job
    warmups = {v: Samples() for v in VARIANTS}
    samples = {v: Samples() for v in VARIANTS}
    pings: list[float] = []
    worker: Managed | None = None
    stored_hit_key = False
    try:
        worker = start_ours("cache", redis_url=cfg.redis_url, queue=queue, chains=chains,
                            metrics_channel=f"bench:{run_id}:metrics")  # fmt: skip
        note("cache: waiting for the worker (litellm import)...")
        await wait_listening(worker, redis)
        await probe_ours(worker, client, warm.job_ids)
        # Prime the hit: its first run is a miss that stores the answer.
        handle = await client.enqueue(hit_prompt, cache_ttl=TTL_S)
        warm.job_ids.append(handle.job_id)
        primed = await handle.result(timeout=JOB_TIMEOUT_S)
        if primed.cached:
            raise RuntimeError("the hit's prompt was already cached")
        for v in VARIANTS:
            await timed_jobs(measures[v], cfg.warmup, warmups[v], record=False)
        per_round = shares(cfg.jobs, cfg.rounds)
        for r in range(cfg.rounds):
            order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
            for v in order:
                await timed_jobs(measures[v], per_round[r], samples[v], record=True)
            for _ in range(100):
                t0 = time.perf_counter()
                await redis.ping()
                pings.append((time.perf_counter() - t0) * 1000)
            note(f"cache: round {r + 1}/{cfg.rounds} done")
        keys = _entry_keys(chains, [hit_prompt, *miss_prompts])
        stored_hit_key = bool(await redis.exists(keys[0]))
    finally:
        if worker is not None:
            worker.stop()
        hits = warmups["hit"].job_ids + samples["hit"].job_ids
        others = warm.job_ids + [
            j for v in ("uncached", "miss") for s in (warmups[v], samples[v]) for j in s.job_ids
        ]
        await forget_jobs(redis, others)
        await _forget_hits(redis, hits)
        await forget_keys(redis, _entry_keys(chains, [hit_prompt, *miss_prompts]))
        await _restore_stats(redis, stats_before)
        await forget_keys(redis, queue_keys(queue))
        await forget_keys(redis, [client.inbox.key])
        await client.aclose()
        await redis.aclose()
    return _report(cfg, samples, pings, stored_hit_key)


async def _restore_stats(redis: Redis, before: dict[Any, Any]) -> None:
    """Put the cache's stats hash back as it was before the run."""
    await redis.delete(CACHE_STATS_KEY)
    if before:
        await redis.hset(CACHE_STATS_KEY, mapping=before)  # type: ignore[misc]


def _report(
    cfg: CacheConfig, samples: dict[str, Samples], pings: list[float], stored_hit_key: bool
) -> dict[str, Any]:
    variants: dict[str, Any] = {}
    for v in VARIANTS:
        s = samples[v]
        variants[v] = {
            "jobs": len(s.total),
            "truncated": s.truncated,
            "errors": len(s.errors),
            "first_error": s.errors[0] if s.errors else None,
            "total_ms": summary(s.total),
            "chain_ms": summary(s.chain),
            "overhead_ms": summary(s.overhead),
        }
    nan = float("nan")
    hit, uncached, miss = (variants[v]["total_ms"] for v in ("hit", "uncached", "miss"))
    ratios = {
        "hit_p50_over_uncached_p50": ratio(hit.get("p50", nan), uncached.get("p50", 0)),
        "miss_p50_over_uncached_p50": ratio(miss.get("p50", nan), uncached.get("p50", 0)),
    }
    floors = {
        "hit_p50_below_uncached_p50": bool(hit.get("p50", 1e9) < uncached.get("p50", 0)),
        "hit_key_found_where_computed": stored_hit_key,
        "no_errors": all(variants[v]["errors"] == 0 for v in VARIANTS),
        "not_truncated": not any(variants[v]["truncated"] for v in VARIANTS),
    }
    rows = []
    for v in VARIANTS:
        t, c, o = (variants[v][k] for k in ("total_ms", "chain_ms", "overhead_ms"))
        rows.append([v, variants[v]["jobs"], variants[v]["errors"],
                     *(t.get(k, nan) for k in ("p50", "p95", "p99", "max")),
                     c.get("p50", nan), o.get("p50", nan)])  # fmt: skip
    ping = summary(pings)
    say(f"Response cache (ms): enqueue -> result in hand, sequential jobs, model {MODEL} at a stub")
    headers = ["variant", "jobs", "err", "p50", "p95", "p99", "max", "chain p50", "rest p50"]
    say(table(headers, rows))
    say(f"redis PING p50 {ping.get('p50', nan):.3f} ms; "
        + "; ".join(f"{k} = {x}" for k, x in ratios.items()))  # fmt: skip
    return {
        "benchmark": "cache",
        "config": {"jobs": cfg.jobs, "warmup": cfg.warmup, "rounds": cfg.rounds, "ttl_s": TTL_S},
        "variants": variants,
        "redis_ping_ms": ping,
        "ratios": ratios,
        "floors": floors,
    }
