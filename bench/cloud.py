"""Cloud models: retries on the same model, and how far a daily budget can be overshot.

1. ``retries``: a chain of two cloud models at the stub, Haiku then Sonnet
   (``breaker_failures`` 1000, timeout 10 s). A third of the jobs carry
   ``stub-fail:haiku=529x1@0.2``: the first Haiku call of that exact request gets
   Anthropic's ``529 overloaded_error`` with ``retry-after: 0.2``, the next is answered.
   The same jobs (each a prompt of its own, tagged per variant) run through one worker with
   Haiku's ``max_retries`` 2 (the default) and 0 (the project before: a 529 went
   straight to Sonnet): share answered by Haiku, retries, cost, latency.
2. ``budget``: two workers (max_jobs 20 each) on one queue, a chain of its own with a
   budget for the UTC day (``LLM_ROUTER_BUDGETS``), and many more jobs than it pays
   for, 40 at a time. After they have all finished: what the day's counters say it
   spent, the overshoot over the budget beside its bound (one call's worst case, as
   the worker computes it, for the largest prompt on Sonnet), jobs answered and jobs
   failed on ``budget:`` skips. Once at the default ``anthropic_max_tokens`` (4096,
   where the bound is far above a stub call's price) and once at 64 (a tight bound).

Every chain is named after the run (``bench_retry_<run>_...``, ``bench_budget_<run>_...``),
so earlier runs and tests do not count. Afterwards the bench deletes the jobs' keys,
the queues, the breakers of its endpoints, its chains' fields of the day's spend hash,
and takes back its increments of the shared metrics counters and of the day's
per-model spend fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from bench.common import (
    COUNTED_PREFIX,
    PER_JOB_PREFIXES,
    note,
    quantile,
    ratio,
    say,
    set_offline_env,
    table,
)
from bench.procs import start_ours, wait_listening
from llm_router.client import RouterClient, RouteResult, build_request
from llm_router.client.keys import METRICS_COUNTERS_KEY, spend_key
from llm_router.client.spend import ChainSpend, read_days, to_nusd, utc_day
from llm_router.worker.metrics import counter_fields

HAIKU = "anthropic/claude-haiku-4-5-20251001"
SONNET = "anthropic/claude-sonnet-4-6"
API_KEY = "sk-ant-bench-0123456789"
MODEL_TIMEOUT_S = 10.0
FAIL_DIRECTIVE = "stub-fail:haiku=529x1@0.2"
RESULT_WAIT_S = 60.0
DEFAULT_MAX_TOKENS = 4096
#: The budget runs: ``anthropic_max_tokens`` of the workers (None: the default, 4096).
MAX_TOKENS_SETTINGS: tuple[int | None, ...] = (None, 64)
BUDGET_WORKERS = 2
FILLER = (
    "The quarterly report lists the north depot's stock, the south depot's orders and "
    "the late deliveries of the week; summarise what changed and what needs a decision. "
)

_BREAKER_PREFIX = "llm_router:breaker:"
_CHAIN_FIELDS = ("spent_nusd", "calls", "reserved_nusd", "budget_nusd")
# Take back what this run added to a shared hash field; drop a field that reaches zero.
_UNCOUNT_LUA = """
local left = redis.call('HINCRBY', KEYS[1], ARGV[1], 0 - tonumber(ARGV[2]))
if left <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return left
"""


@dataclass
class CloudConfig:
    redis_url: str
    retry_jobs: int = 200
    retry_concurrency: int = 20
    budget_jobs: int = 300
    budget_concurrency: int = 40
    budget_max_jobs: int = 20
    budget_usd: float = 0.002


@dataclass
class Ran:
    """One variant's jobs: results by index (None: no result in time), wall time, ids."""

    results: list[RouteResult | None]
    wall_s: float
    job_ids: list[str]


# ---------------------------------------------------------------- processes and jobs


def _model(stub_url: str, model: str, **extra: Any) -> dict[str, Any]:
    cfg = {"model": model, "timeout": MODEL_TIMEOUT_S, "api_base": stub_url, "api_key": API_KEY}
    return {**cfg, "breaker_failures": 1000, **extra}


def _chains(stub_url: str, chain: str, haiku_retries: int | None = None) -> str:
    """``default`` (the worker requires one) and this run's chain: Haiku, then Sonnet."""
    extra = {} if haiku_retries is None else {"max_retries": haiku_retries}
    models = [_model(stub_url, HAIKU, **extra), _model(stub_url, SONNET)]
    return json.dumps({"default": models, chain: models})


async def _drive(
    redis_url: str, queue: str, chain: str, prompts: Sequence[str], concurrency: int, ran: Ran
) -> None:
    """N closed-loop producers: enqueue the next prompt, wait for its result, repeat.

    Fills ``ran`` as it goes, so that the clean-up has every job id even after an error.
    """
    ran.results = [None] * len(prompts)
    indices = iter(range(len(prompts)))  # shared: each producer takes the next one
    async with RouterClient(redis_url, queue_name=queue) as client:

        async def producer() -> None:
            for i in indices:
                handle = await client.enqueue(prompts[i], chain=chain)
                ran.job_ids.append(handle.job_id)
                with contextlib.suppress(TimeoutError):
                    ran.results[i] = await handle.result(
                        timeout=RESULT_WAIT_S, raise_on_failure=False
                    )

        start = time.perf_counter()
        try:
            await asyncio.gather(*(producer() for _ in range(concurrency)))
        finally:
            ran.wall_s = time.perf_counter() - start
            await client.redis.delete(client.inbox.key)


def _answered(results: Sequence[RouteResult | None]) -> list[RouteResult]:
    return [r for r in results if r is not None]


# ---------------------------------------------------------------- clean-up


async def _scan_delete(redis: Redis, pattern: str) -> None:
    keys = [k async for k in redis.scan_iter(match=pattern, count=1000)]
    for start in range(0, len(keys), 500):
        await redis.delete(*keys[start : start + 500])


async def _take_back(
    redis: Redis, results: Sequence[RouteResult], job_ids: Sequence[str], chains: Sequence[str]
) -> None:
    """Undo what these jobs left: their keys, their metrics counts, this run's chains'
    fields of the spend hash and their calls' share of its per-model fields."""
    by_id = {r.job_id: r for r in results if r.job_id}
    ids = [j for j in job_ids if j]
    counted: Counter[str] = Counter()
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        async with redis.pipeline(transaction=False) as pipe:
            for job_id in chunk:
                pipe.exists(COUNTED_PREFIX + job_id)
            marks: list[int] = await pipe.execute()
        for job_id, mark in zip(chunk, marks, strict=True):
            if mark and job_id in by_id:
                counted.update(f"{m}|{o}" for m, o in counter_fields(by_id[job_id]))
        await redis.delete(*(prefix + j for j in chunk for prefix in PER_JOB_PREFIXES))
    for name, n in counted.items():
        await redis.eval(_UNCOUNT_LUA, 1, METRICS_COUNTERS_KEY, name, str(n))  # type: ignore[misc]
    spent: Counter[str] = Counter()
    for result in results:
        for a in result.attempts:
            if a.input_tokens is None:  # no answer: the worker counted nothing for it
                continue
            prefix = f"model|{a.model}|"
            spent[prefix + "calls"] += 1
            spent[prefix + "cost_nusd"] += to_nusd(a.cost_usd)
            spent[prefix + "input_tokens"] += a.input_tokens
            spent[prefix + "output_tokens"] += a.output_tokens or 0
            spent[prefix + "cache_read_input_tokens"] += a.cache_read_input_tokens or 0
            spent[prefix + "cache_creation_input_tokens"] += a.cache_creation_input_tokens or 0
    key = spend_key(utc_day())  # a run across midnight leaves the other day's share
    await redis.hdel(key, *(f"chain|{c}|{f}" for c in chains for f in _CHAIN_FIELDS))  # type: ignore[misc]
    for name, n in spent.items():  # also the zeros (cache tokens): a field left at 0 goes
        await redis.eval(_UNCOUNT_LUA, 1, key, name, str(n))  # type: ignore[misc]


async def _cleanup(
    redis: Redis,
    runs: Sequence[Ran],
    chains: Sequence[str],
    queue: str,
    stub_url: str,
) -> None:
    results = [r for ran in runs for r in _answered(ran.results)]
    ids = [j for ran in runs for j in ran.job_ids]
    await _take_back(redis, results, ids, chains)
    await redis.delete(queue, f"{queue}:batch")
    await _scan_delete(redis, queue + ":*")  # wake-up, idle, inbox, health; the batch queue's
    await redis.delete(*(f"{_BREAKER_PREFIX}{m}@{stub_url}" for m in (HAIKU, SONNET)))


# ---------------------------------------------------------------- 1. retries


def _retry_prompts(run_id: str, variant: str, n: int) -> tuple[list[str], set[int]]:
    """Distinct prompts (the stub counts failures per request text); every third fails."""
    failing = {i for i in range(n) if i % 3 == 0}
    prompts = [
        f"cloud {run_id} {variant} job {i}: say hello"
        + (f" {FAIL_DIRECTIVE}" if i in failing else "")
        for i in range(n)
    ]
    return prompts, failing


def _retry_stats(ran: Ran, failing: set[int]) -> dict[str, Any]:
    done = _answered(ran.results)
    ok = [r for r in done if r.ok]
    jobs = len(ran.results)
    ms = [float(r.latency_ms) for r in ok]
    failed_ms = [
        float(r.latency_ms) for i, r in enumerate(ran.results) if i in failing and r and r.ok
    ]
    cost = sum(r.cost_usd for r in done)
    return {
        "jobs": jobs,
        "ok": len(ok),
        "no_result": jobs - len(done),
        "haiku": sum(r.model_used == HAIKU for r in ok),
        "haiku_share": sum(r.model_used == HAIKU for r in ok) / jobs if jobs else math.nan,
        "sonnet": sum(r.model_used == SONNET for r in ok),
        "retries": sum(a.retries for r in done for a in r.attempts),
        "haiku_529_errors": sum(
            a.model == HAIKU and a.outcome != "success" and a.outcome != "skipped"
            for r in done
            for a in r.attempts
        ),
        "haiku_error_sample": next(
            (a.reason for r in done for a in r.attempts if a.model == HAIKU and a.reason), None
        ),
        "retry_error_sample": next(
            (a.retry_error for r in done for a in r.attempts if a.retry_error), None
        ),
        "cost_usd": round(cost, 9),
        "cost_per_job_usd": round(cost / jobs, 9) if jobs else math.nan,
        "p50_ms": quantile(ms, 0.5),
        "p95_ms": quantile(ms, 0.95),
        "p50_ms_529_jobs": quantile(failed_ms, 0.5),
        "wall_s": round(ran.wall_s, 3),
    }


async def retries(
    cfg: CloudConfig, redis: Redis, stub_url: str, run_id: str, tag: str
) -> dict[str, Any]:
    variants = {"max_retries 2 (default)": 2, "max_retries 0 (before)": 0}
    stats: dict[str, dict[str, Any]] = {}
    for v, (name, haiku_retries) in enumerate(variants.items()):
        chain = f"bench_retry_{tag}_r{haiku_retries}"
        queue = f"bench:{run_id}:cloud:retry:{haiku_retries}"
        prompts, failing = _retry_prompts(run_id, f"r{haiku_retries}", cfg.retry_jobs)
        worker = start_ours(
            f"cloud-retry-{haiku_retries}",
            redis_url=cfg.redis_url,
            queue=queue,
            chains=_chains(stub_url, chain, haiku_retries),
            metrics_channel=f"bench:{run_id}:metrics",
            max_jobs=cfg.retry_concurrency,
        )
        ran = Ran([], 0.0, [])
        try:
            note(f"cloud: retries {v + 1}/{len(variants)}, {name}: waiting for the worker...")
            await wait_listening(worker, redis)
            note(f"cloud: {cfg.retry_jobs} jobs, {cfg.retry_concurrency} at a time")
            await _drive(cfg.redis_url, queue, chain, prompts, cfg.retry_concurrency, ran)
            worker.check_alive()
        finally:
            worker.stop()
            await _cleanup(redis, [ran], [chain], queue, stub_url)
        stats[name] = _retry_stats(ran, failing)
        note(f"cloud: {name}: {stats[name]}")
    with_r, without = stats["max_retries 2 (default)"], stats["max_retries 0 (before)"]
    cost_ratio = ratio(without["cost_usd"], with_r["cost_usd"])
    _retry_table(cfg, stats, cost_ratio)
    return {
        "variants": stats,
        "cost_without_over_with_retries": cost_ratio,
        "all_ok": all(s["ok"] == s["jobs"] for s in stats.values()),
        "floor_met": bool(cost_ratio > 1 and with_r["haiku_share"] == 1.0),
    }


def _retry_table(cfg: CloudConfig, stats: dict[str, dict[str, Any]], cost_ratio: float) -> None:
    names = list(stats)
    lines: list[tuple[str, str]] = [
        ("jobs", "jobs"),
        ("ok", "ok"),
        ("answered by Haiku", "haiku_share"),
        ("answered by Sonnet", "sonnet"),
        ("Haiku attempts ended in error (529)", "haiku_529_errors"),
        ("retries (sum of attempt.retries)", "retries"),
        ("total cost_usd", "cost_usd"),
        ("mean cost per job", "cost_per_job_usd"),
        ("p50 latency ms", "p50_ms"),
        ("p95 latency ms", "p95_ms"),
        ("p50 ms of the 529'd third", "p50_ms_529_jobs"),
        ("wall s", "wall_s"),
    ]
    rows: list[list[object]] = []
    for label, key in lines:
        cells: list[object] = [label]
        for name in names:
            value = stats[name][key]
            if key == "haiku_share":
                cells.append(f"{value:.1%}")
            elif key in ("cost_usd", "cost_per_job_usd"):
                cells.append(f"${value:.6f}")
            elif key in ("p50_ms", "p95_ms", "p50_ms_529_jobs"):
                cells.append(f"{value:.0f}")
            else:
                cells.append(value)
        rows.append(cells)
    say(
        f"1. Retries on the same model: {cfg.retry_jobs} jobs ({cfg.retry_concurrency} at a "
        f"time, one worker), Haiku then Sonnet at the stub; every third job's first Haiku call "
        f"gets 529 overloaded_error (retry-after 0.2 s)"
    )
    say(table(["", *names], rows))
    say(f"cost without retries / with retries: {cost_ratio}")
    for name in names:
        sample = stats[name]["retry_error_sample"] or stats[name]["haiku_error_sample"]
        say(f"{name}: {'retried after' if stats[name]['retries'] else 'fell back on'} {sample!r}")


# ---------------------------------------------------------------- 2. budget


def _budget_prompts(run_id: str, setting: str, n: int) -> list[str]:
    """Distinct prompts of 200 to 380 characters."""
    prompts = []
    for i in range(n):
        head = f"budget {run_id} {setting} job {i}: "
        body = (FILLER * 3)[: 200 + (i % 7) * 30 - len(head)]
        prompts.append(head + body)
    return prompts


def _prompt_bytes(prompt: str, chain: str) -> int:
    """As the worker measures a request for its worst case: messages and schema as JSON."""
    request = build_request(prompt, chain=chain)
    messages = [m.model_dump(mode="json") for m in request.messages]
    return len(json.dumps([messages, request.json_schema], ensure_ascii=False).encode())


async def _budget_run(
    cfg: CloudConfig,
    redis: Redis,
    stub_url: str,
    run_id: str,
    tag: str,
    max_tokens: int | None,
) -> dict[str, Any]:
    from llm_router.worker.costs import worst_case_usd

    out_tokens = max_tokens or DEFAULT_MAX_TOKENS
    setting = f"mt{out_tokens}"
    chain = f"bench_budget_{tag}_{setting}"
    queue = f"bench:{run_id}:cloud:budget:{setting}"
    prompts = _budget_prompts(run_id, setting, cfg.budget_jobs)
    biggest = max(_prompt_bytes(p, chain) for p in prompts)
    bound = {m: worst_case_usd(m, biggest, out_tokens) for m in (HAIKU, SONNET)}
    extra = {"LLM_ROUTER_BUDGETS": json.dumps({chain: cfg.budget_usd})}
    if max_tokens is not None:
        extra["LLM_ROUTER_ANTHROPIC_MAX_TOKENS"] = str(max_tokens)
    workers = [
        start_ours(
            f"cloud-budget-{setting}-{i}",
            redis_url=cfg.redis_url,
            queue=queue,
            chains=_chains(stub_url, chain),
            metrics_channel=f"bench:{run_id}:metrics",
            max_jobs=cfg.budget_max_jobs,
            extra=extra,
        )
        for i in range(1, BUDGET_WORKERS + 1)
    ]
    ran = Ran([], 0.0, [])
    spends: list[ChainSpend] = []
    try:
        note(f"cloud: budget, max_tokens {out_tokens}: waiting for {BUDGET_WORKERS} workers...")
        for worker in workers:
            await wait_listening(worker, redis)
        note(f"cloud: {cfg.budget_jobs} jobs, {cfg.budget_concurrency} at a time")
        await _drive(cfg.redis_url, queue, chain, prompts, cfg.budget_concurrency, ran)
        for worker in workers:
            worker.check_alive()
            worker.stop()  # every hold settled before the counters are read
        days = await read_days(redis, 2)
        spends = [d.chains[chain] for d in days if chain in d.chains]
    finally:
        for worker in workers:
            worker.stop()
        await _cleanup(redis, [ran], [chain], queue, stub_url)
    return _budget_stats(cfg, ran, spends, bound, biggest, out_tokens)


def _budget_stats(
    cfg: CloudConfig,
    ran: Ran,
    spends: Sequence[ChainSpend],
    bound: dict[str, float],
    biggest: int,
    out_tokens: int,
) -> dict[str, Any]:
    done = _answered(ran.results)
    ok = [r for r in done if r.ok]
    failed = [r for r in done if not r.ok]
    on_budget = [
        r
        for r in failed
        if r.attempts
        and all(
            a.outcome == "skipped" and (a.reason or "").startswith("budget") for a in r.attempts
        )
    ]
    spent = sum(s.spent_usd for s in spends)
    calls = sum(s.calls for s in spends)
    held = sum(s.reserved_usd for s in spends)
    attempts_nusd = sum(
        to_nusd(a.cost_usd) for r in done for a in r.attempts if a.input_tokens is not None
    )
    answered_usd = sum(r.cost_usd for r in ok)
    overshoot = spent - cfg.budget_usd
    sample = next((r.attempts[-1].reason for r in on_budget), None)
    return {
        "max_tokens": out_tokens,
        "budget_usd": cfg.budget_usd,
        "jobs": len(ran.results),
        "no_result": len(ran.results) - len(done),
        "answered": len(ok),
        "answered_haiku": sum(r.model_used == HAIKU for r in ok),
        "answered_sonnet": sum(r.model_used == SONNET for r in ok),
        "failed_on_budget": len(on_budget),
        "failed_other": len(failed) - len(on_budget),
        "calls_counted": calls,
        "spent_usd": spent,
        "held_after_usd": held,
        "spent_from_results_usd": round(answered_usd, 10),
        "counter_minus_attempts_nusd": to_nusd(spent) - attempts_nusd,
        "reached": bool(spent >= cfg.budget_usd),
        "overshoot_usd": overshoot,
        "overshoot_pct_of_budget": overshoot / cfg.budget_usd * 100,
        "largest_prompt_bytes": biggest,
        "bound_usd": bound[SONNET],
        "bound_haiku_usd": bound[HAIKU],
        "overshoot_over_bound": overshoot / bound[SONNET] if bound[SONNET] else math.nan,
        "within_bound": bool(overshoot <= bound[SONNET]),
        "budget_reason_sample": sample,
        "wall_s": round(ran.wall_s, 3),
    }


async def budget(
    cfg: CloudConfig, redis: Redis, stub_url: str, run_id: str, tag: str
) -> dict[str, Any]:
    settings: dict[str, dict[str, Any]] = {}
    for max_tokens in MAX_TOKENS_SETTINGS:
        stats = await _budget_run(cfg, redis, stub_url, run_id, tag, max_tokens)
        settings[f"max_tokens {stats['max_tokens']}"] = stats
        note(f"cloud: budget, max_tokens {stats['max_tokens']}: {stats}")
    _budget_table(cfg, settings)
    within = all(s["within_bound"] for s in settings.values())
    skips = all(s["failed_on_budget"] > 0 for s in settings.values())
    exact = all(s["counter_minus_attempts_nusd"] == 0 for s in settings.values())
    settled = all(s["held_after_usd"] == 0 for s in settings.values())
    return {
        "settings": settings,
        "within_bound": within,
        "budget_skips_seen": skips,
        "counter_matches_attempts": exact,
        "holds_settled": settled,
        "floor_met": bool(within and skips and exact and settled),
    }


def _budget_table(cfg: CloudConfig, settings: dict[str, dict[str, Any]]) -> None:
    names = list(settings)

    def usd(x: float) -> str:
        return f"${x:.6f}" if not math.isnan(x) else "-"

    lines: list[tuple[str, Callable[[dict[str, Any]], object]]] = [
        ("budget (USD per UTC day)", lambda s: usd(s["budget_usd"])),
        ("jobs", lambda s: s["jobs"]),
        (
            "answered (Haiku + Sonnet)",
            lambda s: f"{s['answered']} ({s['answered_haiku']} + {s['answered_sonnet']})",
        ),
        ("failed: every attempt a budget skip", lambda s: s["failed_on_budget"]),
        ("failed otherwise / no result", lambda s: f"{s['failed_other']} / {s['no_result']}"),
        ("calls counted", lambda s: s["calls_counted"]),
        ("spent (day's counter)", lambda s: usd(s["spent_usd"])),
        ("spent (sum of result.cost_usd)", lambda s: usd(s["spent_from_results_usd"])),
        ("counter - attempts, nano-USD", lambda s: s["counter_minus_attempts_nusd"]),
        ("held after the run", lambda s: usd(s["held_after_usd"])),
        ("budget reached (spent >= budget)", lambda s: "yes" if s["reached"] else "no"),
        ("overshoot = spent - budget", lambda s: usd(s["overshoot_usd"])),
        ("overshoot, % of budget", lambda s: f"{s['overshoot_pct_of_budget']:+.1f} %"),
        ("bound: worst case, largest prompt, Sonnet", lambda s: usd(s["bound_usd"])),
        ("(the same on Haiku)", lambda s: usd(s["bound_haiku_usd"])),
        ("overshoot / bound", lambda s: f"{s['overshoot_over_bound']:.3f}"),
        ("within the bound", lambda s: "yes" if s["within_bound"] else "NO"),
        ("wall s", lambda s: s["wall_s"]),
    ]
    rows = [[label, *(get(settings[n]) for n in names)] for label, get in lines]
    say(
        f"2. Budget overshoot: {cfg.budget_jobs} jobs ({cfg.budget_concurrency} at a time) on "
        f"{BUDGET_WORKERS} workers (max_jobs {cfg.budget_max_jobs} each), a chain of its own "
        f"(Haiku then Sonnet) with a budget of ${cfg.budget_usd:g} a day; largest prompt "
        f"{next(iter(settings.values()))['largest_prompt_bytes']} bytes as the worker counts it"
    )
    say(table(["", *names], rows))
    sample = next(
        (s["budget_reason_sample"] for s in settings.values() if s["budget_reason_sample"]), None
    )
    say(f"a budget skip's reason: {sample!r}")


# ---------------------------------------------------------------- the benchmark


async def run(cfg: CloudConfig, stub_url: str, run_id: str) -> dict[str, Any]:
    set_offline_env()  # before litellm is imported here (for worst_case_usd)
    tag = run_id.replace("-", "_")
    redis = Redis.from_url(cfg.redis_url)
    try:
        first = await retries(cfg, redis, stub_url, run_id, tag)
        say()
        second = await budget(cfg, redis, stub_url, run_id, tag)
    finally:
        with contextlib.suppress(Exception):
            await _scan_delete(redis, f"bench:{run_id}:cloud:*")
        await redis.aclose()
    return {
        "benchmark": "cloud",
        "config": {
            "retry_jobs": cfg.retry_jobs,
            "retry_concurrency": cfg.retry_concurrency,
            "budget_jobs": cfg.budget_jobs,
            "budget_concurrency": cfg.budget_concurrency,
            "budget_workers": BUDGET_WORKERS,
            "budget_max_jobs": cfg.budget_max_jobs,
            "budget_usd": cfg.budget_usd,
            "fail_directive": FAIL_DIRECTIVE,
        },
        "retries": first,
        "budget": second,
        "floors": {
            "retries_cheaper_all_on_haiku": first["floor_met"],
            "retries_all_ok": first["all_ok"],
            "budget_overshoot_within_bound": second["within_bound"],
            "budget_counters_exact_and_settled": bool(
                second["counter_matches_attempts"] and second["holds_settled"]
            ),
            "budget_skips_seen": second["budget_skips_seen"],
        },
    }
