"""Backfill: rows/s into Redis, rows/s end to end through two workers, and flat memory.

1. ``enqueue``: how fast a backfill gets its rows into Redis with no worker serving the
   batch queue: ``Backfill`` in this process (``max_in_flight`` = the rows), timed until
   ``summary().enqueued`` reaches the row count; beside it today's one-at-a-time
   ``RouterClient.enqueue`` (sequential awaits), in the same rounds. Floor: 20,000 rows/s.
2. ``end_to_end``: two workers (max_jobs M) on one queue, the stub answering at once.
   A producer driver (N closed-loop coroutines on the interactive queue) measures what
   those workers can do; then ``llm-router backfill`` as a process of its own (stderr to a
   log file) routes R distinct short prompts through their batch queue: rows/s = R over
   its wall time, start to exit. The producer runs before and after (interleaved);
   floor: the backfill's median >= 90 % of the producers' median.
3. ``memory``: the backfill process's peak RSS (``VmHWM`` of /proc/<pid>/status, read
   until it exits; not ``ru_maxrss``, which counts the forking bench's pages from before
   the exec) at the small and the large row count, through the same workers. Flat:
   within 5 MB.

Every key is cleaned at the end: the queues and their lists (all under this run's
``bench:<run id>:backfill`` prefix), the jobs' keys, the reply lists, and this run's
increments of the shared metrics counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from bench.common import (
    JOB_TIMEOUT_S,
    PYTHON,
    base_env,
    chains_json,
    cpu_sample,
    forget_jobs,
    forget_keys,
    median,
    note,
    ratio,
    redis_pid,
    say,
    table,
)
from bench.procs import Managed, start_driver, start_ours, wait_driver_ready, wait_listening
from llm_router.client import RouterClient
from llm_router.client.backfill import Backfill
from llm_router.client.rows import RowParser, job_id_for, reply_key_for, run_key

ENQUEUE_FLOOR_ROWS_PER_S = 20_000.0
E2E_FLOOR_RATIO = 0.9
RSS_FLAT_MB = 5.0
CLIENT_WARMUP = 100  # RouterClient enqueues before its clock starts (connection, script)
POLL_S = 0.005


@dataclass
class BackfillConfig:
    redis_url: str
    rows: int = 100_000
    rss_rows: int = 10_000
    client_rows: int = 5_000
    rounds: int = 3
    e2e_rounds: int = 1
    concurrency: int = 50
    max_jobs: int = 50
    duration: float = 10.0
    warmup: float = 2.0


# ---------------------------------------------------------------- files and keys


def _write_input(path: Path, rows: int) -> None:
    """One distinct short prompt a row."""
    with path.open("w") as file:
        for i in range(rows):
            file.write(json.dumps({"id": f"r{i}", "prompt": f"row {i}: say hello"}) + "\n")


def _job_ids(input_path: Path, output_path: Path) -> list[str]:
    """The job ids the backfill gives the rows of ``input_path`` for ``output_path``."""
    parser = RowParser()
    key = run_key(output_path)
    ids: list[str] = []
    with input_path.open("rb") as file:
        for lineno, raw in enumerate(file, start=1):
            if raw.strip():
                claim = RowParser.claim(lineno, raw)
                ids.append(job_id_for(key, claim.id, parser.request(claim)))
    return ids


def _check_output(path: Path, rows: int) -> tuple[dict[str, Any], list[str]]:
    """Lines, statuses and distinct ids of an output file, and what is wrong with it."""
    lines = 0
    statuses: Counter[str] = Counter()
    ids: set[str] = set()
    first_error: str | None = None
    problems: list[str] = []
    try:
        with path.open("rb") as file:
            for raw in file:
                lines += 1
                try:
                    row = json.loads(raw)
                except ValueError:
                    statuses["unparsable"] += 1
                    continue
                statuses[str(row.get("status"))] += 1
                ids.add(str(row.get("id")))
                if row.get("status") != "ok" and first_error is None:
                    first_error = str(row.get("error"))[:300]
    except OSError as exc:
        problems.append(f"cannot read the output: {exc}")
    if lines != rows:
        problems.append(f"output has {lines} lines, expected {rows}")
    if len(ids) != lines:
        problems.append(f"output has {lines - len(ids)} duplicate ids")
    if statuses.get("ok", 0) != lines:
        problems.append(f"not every row ok: {dict(statuses)} (first error: {first_error})")
    return {"lines": lines, "statuses": dict(statuses), "distinct_ids": len(ids)}, problems


def _summary_lines(log: Path) -> dict[str, str]:
    """The ``key=value`` lines the command prints at the end when stderr is not a terminal."""
    pairs: dict[str, str] = {}
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return pairs
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key and " " not in key:
            pairs[key] = value
    return pairs


def _remove(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _reap(pid: int) -> tuple[int, int, resource.struct_rusage]:
    """``os.wait4`` without blocking: (0, 0, _) while the child runs."""
    return os.wait4(pid, os.WNOHANG)


def _peak_rss_kb(pid: int) -> int | None:
    """The process's high-water RSS since its exec (KiB), while it runs."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


async def _forget_prefix(redis: Redis, prefix: str) -> int:
    """Every key under this run's own prefix: queues, wake-up, idle, inbox, health keys."""
    keys = [k async for k in redis.scan_iter(match=prefix + "*", count=1000)]
    for start in range(0, len(keys), 500):
        await redis.delete(*keys[start : start + 500])
    return len(keys)


# ---------------------------------------------------------------- 1. enqueue rate


async def _enqueue_backfill(
    redis: Redis, input_path: Path, output_path: Path, rows: int, queue: str
) -> dict[str, Any]:
    """Rows/s until the in-process backfill has queued every row (no worker serves it)."""
    backfill = Backfill(redis, input_path, output_path, max_in_flight=rows, batch_queue=queue)
    start = time.perf_counter()
    task = asyncio.create_task(backfill.run())
    deadline = start + 60 + rows / 1000
    try:
        while (enqueued := backfill.summary().enqueued) < rows:
            if task.done():
                raise RuntimeError(f"the backfill ended at {enqueued} rows: {task.result()}")
            if time.perf_counter() > deadline:
                raise TimeoutError(f"the backfill queued {enqueued} of {rows} rows in time")
            await asyncio.sleep(POLL_S)
        elapsed = time.perf_counter() - start
    finally:
        backfill.stop()
        await asyncio.gather(task, return_exceptions=True)
        ids = [i.decode() for i in await redis.zrange(queue, 0, -1)]
        await forget_jobs(redis, ids)
        await forget_keys(redis, [reply_key_for(run_key(output_path))])
        _remove(output_path)
    return {"rows_per_s": round(rows / elapsed, 1), "elapsed_s": round(elapsed, 3)}


async def _enqueue_client(redis_url: str, rows: int, queue: str) -> dict[str, Any]:
    """Rows/s of sequential ``RouterClient.enqueue`` awaits (no worker serves the queue)."""
    client = RouterClient(redis_url, queue_name=queue)
    ids: list[str] = []
    try:
        for i in range(CLIENT_WARMUP):
            ids.append((await client.enqueue(f"warm-up {i}: say hello")).job_id)
        start = time.perf_counter()
        for i in range(rows):
            handle = await client.enqueue(f"row {i}: say hello")
            ids.append(handle.job_id)
        elapsed = time.perf_counter() - start
    finally:
        await forget_jobs(client.redis, ids)
        await forget_keys(client.redis, [client.inbox.key])
        await client.aclose()
    return {"rows_per_s": round(rows / elapsed, 1), "elapsed_s": round(elapsed, 3)}


async def enqueue_rate(
    cfg: BackfillConfig, redis: Redis, input_path: Path, tmp: Path, prefix: str
) -> dict[str, Any]:
    rounds: list[dict[str, Any]] = []
    for r in range(cfg.rounds):
        order = ("backfill", "client") if r % 2 == 0 else ("client", "backfill")
        for variant in order:
            queue = f"{prefix}:enqueue:{variant}:{r}"  # no worker serves it
            if variant == "backfill":
                out = await _enqueue_backfill(
                    redis, input_path, tmp / f"enqueue-{r}.jsonl", cfg.rows, queue
                )
            else:
                out = await _enqueue_client(cfg.redis_url, cfg.client_rows, queue)
            await _forget_prefix(redis, queue)
            rounds.append({"variant": variant, "round": r + 1, **out})
            note(f"backfill: enqueue round {r + 1}/{cfg.rounds} {variant}: {out['rows_per_s']}/s")
    return _enqueue_report(cfg, rounds)


def _enqueue_report(cfg: BackfillConfig, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    rates = {
        v: [r["rows_per_s"] for r in rounds if r["variant"] == v] for v in ("backfill", "client")
    }
    med = {v: median(rates[v]) for v in rates}
    speedup = ratio(med["backfill"], med["client"])
    met = bool(med["backfill"] >= ENQUEUE_FLOOR_ROWS_PER_S)
    say(
        f"Enqueue rate (rows/s into Redis, no worker serving the queue), medians of "
        f"{cfg.rounds} round(s)"
    )
    rows = [
        [
            "Backfill (in-process)",
            cfg.rows,
            med["backfill"],
            " ".join(f"{x:.0f}" for x in rates["backfill"]),
            speedup,
        ],
        [
            "RouterClient.enqueue",
            cfg.client_rows,
            med["client"],
            " ".join(f"{x:.0f}" for x in rates["client"]),
            1.0,
        ],
    ]
    say(table(["variant", "rows", "rows/s", "rounds", "/client"], rows))
    say(
        f"floor backfill >= {ENQUEUE_FLOOR_ROWS_PER_S:,.0f} rows/s: {'MET' if met else 'MISSED'} "
        f"({med['backfill']:,.0f} rows/s, {speedup}x RouterClient.enqueue)"
    )
    return {
        "backfill_rows_per_s": med["backfill"],
        "client_rows_per_s": med["client"],
        "backfill_over_client": speedup,
        "floor_met": met,
        "rounds": rounds,
    }


# ---------------------------------------------------------------- 2 and 3. through workers


@dataclass
class Lane:
    """Two workers on one queue (and its batch queue), a producer driver, what to sample."""

    queue: str
    workers: list[Managed]
    driver: Managed
    pids: dict[str, int]


async def _producer_run(cfg: BackfillConfig, lane: Lane) -> dict[str, Any]:
    lane.driver.send(
        {
            "cmd": "run",
            "concurrency": cfg.concurrency,
            "warmup": cfg.warmup,
            "duration": cfg.duration,
            "max_jobs": int(cfg.duration * 2000) + 10_000,
            "pids": lane.pids,
        }
    )
    timeout = cfg.warmup + cfg.duration + JOB_TIMEOUT_S + 60
    out: dict[str, Any] = json.loads(await asyncio.to_thread(lane.driver.read_line, timeout))
    return {
        "jobs_per_s": out["jobs_per_s"],
        "window_jobs": out["window_jobs"],
        "errors": out["errors"],
        "first_error": out["first_error"],
        "cpu_pct": out["cpu_pct"],
    }


async def _cli_run(
    cfg: BackfillConfig, redis: Redis, lane: Lane, input_path: Path, output_path: Path, rows: int
) -> dict[str, Any]:
    """``llm-router backfill`` as a process: wall time, exit status, peak RSS, CPU."""
    argv = [PYTHON, "-m", "llm_router.client.cli", "--redis-url", cfg.redis_url, "backfill"]
    argv += [str(input_path), "--output", str(output_path), "--batch-queue", lane.queue + ":batch"]
    problems: list[str] = []
    timeout = 60 + rows / 100
    cpu_a = cpu_sample(lane.pids)
    start = time.perf_counter()
    proc = Managed(f"backfill-cli-{rows}", argv, base_env())
    exit_code: int | None = None
    rss_kb = 0
    own_cpu_s = float("nan")
    try:
        while True:
            rss_kb = _peak_rss_kb(proc.pid) or rss_kb  # monotonic: the last read is the peak
            pid, status, usage = _reap(proc.pid)
            if pid != 0:
                break
            if time.perf_counter() - start > timeout:
                problems.append(f"no exit within {timeout:.0f} s (stopped)")
                break
            await asyncio.sleep(POLL_S)
        wall = time.perf_counter() - start
        cpu_b = cpu_sample(lane.pids)
        if pid != 0:
            exit_code = os.waitstatus_to_exitcode(status)
            proc.proc.returncode = exit_code  # reaped here: Popen must not wait for it
            own_cpu_s = usage.ru_utime + usage.ru_stime
    finally:
        proc.stop()
    if exit_code != 0 and exit_code is not None:
        problems.append(f"exit status {exit_code}: {proc.log_tail(5)!r}")
    checked, output_problems = await asyncio.to_thread(_check_output, output_path, rows)
    problems += output_problems
    summary = _summary_lines(proc.log_path)
    if summary.get("ended") != "complete":
        problems.append(
            f"summary ended={summary.get('ended')!r} missing={summary.get('missing')!r}"
        )
    ids = await asyncio.to_thread(_job_ids, input_path, output_path)
    await forget_jobs(redis, ids)
    await forget_keys(redis, [reply_key_for(run_key(output_path))])
    _remove(output_path)
    cpu = {n: round((cpu_b[n] - cpu_a[n]) / wall * 100, 1) for n in lane.pids}
    cpu["backfill"] = round(own_cpu_s / wall * 100, 1)
    for worker in lane.workers:
        worker.check_alive()
    return {
        "rows": rows,
        "rows_per_s": round(rows / wall, 1) if exit_code == 0 else float("nan"),
        "wall_s": round(wall, 3),
        "exit": exit_code,
        "peak_rss_mb": round(rss_kb / 1024, 1) if rss_kb else float("nan"),
        "own_elapsed_s": float(summary.get("elapsed_s", "nan")),
        "own_rate": float(summary.get("rate", "nan")),
        "cpu_pct": cpu,
        **checked,
        "log": str(proc.log_path),
        "problems": problems,
    }


async def through_workers(
    cfg: BackfillConfig,
    redis: Redis,
    inputs: dict[int, Path],
    tmp: Path,
    stub_url: str,
    stub_pid: int,
    prefix: str,
    channel: str,
) -> dict[str, Any]:
    chains = chains_json(stub_url)
    queue = f"{prefix}:e2e"
    started: list[Managed] = []
    driver: Managed | None = None
    producer: list[dict[str, Any]] = []
    cli: list[dict[str, Any]] = []
    try:
        workers = [
            start_ours(
                f"backfill-w{i}",
                redis_url=cfg.redis_url,
                queue=queue,
                chains=chains,
                metrics_channel=channel,
                max_jobs=cfg.max_jobs,
            )
            for i in (1, 2)
        ]
        driver = start_driver(
            "backfill-producer", "producer", redis_url=cfg.redis_url, queue=queue, chains=chains
        )
        started = [*workers, driver]
        note("backfill: waiting for 2 workers and the producer driver...")
        for w in workers:
            await wait_listening(w, redis)
        await wait_driver_ready(driver)
        pids = {"w1": workers[0].pid, "w2": workers[1].pid, "stub": stub_pid}
        if (rpid := await redis_pid(redis)) is not None:
            pids["redis"] = rpid
        lane = Lane(queue, workers, driver, pids)
        sizes = [cfg.rows] + ([cfg.rss_rows] if cfg.rss_rows != cfg.rows else [])
        for r in range(cfg.e2e_rounds + 1):
            out = await _producer_run(cfg, lane)
            producer.append({"round": r + 1, **out})
            note(f"backfill: producer run {r + 1}/{cfg.e2e_rounds + 1}: {out['jobs_per_s']} jobs/s")
            if r == cfg.e2e_rounds:
                break
            for rows in sizes:
                output_path = tmp / f"e2e-{rows}-{r}.jsonl"
                run = await _cli_run(cfg, redis, lane, inputs[rows], output_path, rows)
                cli.append({"round": r + 1, **run})
                note(
                    f"backfill: CLI round {r + 1}/{cfg.e2e_rounds} {rows} rows: "
                    f"{run['rows_per_s']} rows/s, exit {run['exit']}, "
                    f"peak RSS {run['peak_rss_mb']} MB"
                    + (f", PROBLEMS: {run['problems']}" if run["problems"] else "")
                )
    finally:
        if driver is not None:  # "stop" lets it delete its keys; a SIGTERM cuts that short
            with contextlib.suppress(OSError, ValueError):
                driver.send({"cmd": "stop"})
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(driver.proc.wait, 15)
        for proc in reversed(started):
            proc.stop()
    return {"producer": producer, "cli": cli}


def _e2e_report(
    cfg: BackfillConfig, producer: list[dict[str, Any]], cli: list[dict[str, Any]]
) -> dict[str, Any]:
    prod_rate = median(p["jobs_per_s"] for p in producer)
    big = [c for c in cli if c["rows"] == cfg.rows]
    bf_rate = median(c["rows_per_s"] for c in big)
    r = ratio(bf_rate, prod_rate)
    met = bool(r >= E2E_FLOOR_RATIO)
    prod_cpu = {
        k: median(p["cpu_pct"].get(k, float("nan")) for p in producer)
        for k in ("w1", "w2", "driver", "stub", "redis")
    }
    bf_cpu = {
        k: median(c["cpu_pct"].get(k, float("nan")) for c in big)
        for k in ("w1", "w2", "backfill", "stub", "redis")
    }
    say(
        f"End to end through 2 workers (max_jobs {cfg.max_jobs}, instant stub): producers "
        f"N={cfg.concurrency} closed loop for {cfg.duration:.0f} s windows vs the backfill CLI "
        f"on {cfg.rows} rows (wall time, start to exit); medians; CPU in % of one core"
    )
    headers = [
        "variant",
        "rows/s",
        "runs",
        "/producer",
        "worker %",
        "client %",
        "stub %",
        "redis %",
        "errors",
    ]
    rows = [
        [
            f"producer (N={cfg.concurrency})",
            prod_rate,
            " ".join(f"{p['jobs_per_s']:.0f}" for p in producer),
            1.0,
            f"{prod_cpu['w1']:.0f}+{prod_cpu['w2']:.0f}",
            prod_cpu["driver"],
            prod_cpu["stub"],
            prod_cpu["redis"],
            sum(p["errors"] for p in producer),
        ],
        [
            f"backfill CLI ({cfg.rows} rows)",
            bf_rate,
            " ".join(f"{c['rows_per_s']:.0f}" for c in big),
            r,
            f"{bf_cpu['w1']:.0f}+{bf_cpu['w2']:.0f}",
            bf_cpu["backfill"],
            bf_cpu["stub"],
            bf_cpu["redis"],
            sum(len(c["problems"]) for c in big),
        ],
    ]
    say(table(headers, rows))
    own = median(c["own_rate"] for c in big)
    say(
        f"floor backfill >= {E2E_FLOOR_RATIO:.0%} of the producers: {'MET' if met else 'MISSED'} "
        f"({r}); the command's own rate (its elapsed_s, without process start) {own:.0f} rows/s"
    )
    return {
        "producer_jobs_per_s": prod_rate,
        "backfill_rows_per_s": bf_rate,
        "backfill_own_rate": own,
        "backfill_over_producer": r,
        "producer_cpu_pct": prod_cpu,
        "backfill_cpu_pct": bf_cpu,
        "floor_met": met,
    }


def _memory_report(cfg: BackfillConfig, cli: list[dict[str, Any]]) -> dict[str, Any]:
    sizes = sorted({c["rows"] for c in cli})
    peak = {n: median(c["peak_rss_mb"] for c in cli if c["rows"] == n) for n in sizes}
    small = peak.get(cfg.rss_rows, float("nan"))
    diff = round(peak.get(cfg.rows, float("nan")) - small, 1)
    flat = bool(abs(diff) <= RSS_FLAT_MB)
    say(
        f"Peak RSS of the backfill process (VmHWM, read until it exits), medians of "
        f"{cfg.e2e_rounds} run(s)"
    )
    rows = []
    for n in sizes:
        mine = [c for c in cli if c["rows"] == n]
        rows.append(
            [
                f"{n} rows",
                peak[n],
                " ".join(f"{c['peak_rss_mb']:.1f}" for c in mine),
                median(c["rows_per_s"] for c in mine),
                median(c["wall_s"] for c in mine),
                " ".join(str(c["exit"]) for c in mine),
                " ".join(str(c["lines"]) for c in mine),
                sum(len(c["problems"]) for c in mine),
            ]
        )
    say(table(["input", "peak MB", "runs", "rows/s", "wall s", "exit", "lines", "problems"], rows))
    say(
        f"flat memory ({cfg.rows} rows within {RSS_FLAT_MB:.0f} MB of {cfg.rss_rows}): "
        f"{'MET' if flat else 'MISSED'} (difference {diff:+.1f} MB)"
    )
    return {
        "peak_rss_mb": {str(n): peak[n] for n in sizes},
        "difference_mb": diff,
        "floor_met": flat,
    }


# ---------------------------------------------------------------- the benchmark


async def run(cfg: BackfillConfig, stub_url: str, stub_pid: int, run_id: str) -> dict[str, Any]:
    prefix = f"bench:{run_id}:backfill"
    channel = f"bench:{run_id}:metrics"
    redis = Redis.from_url(cfg.redis_url)
    try:
        with tempfile.TemporaryDirectory(prefix="llm-router-bench-backfill-") as tmp_name:
            tmp = Path(tmp_name)
            inputs: dict[int, Path] = {}
            for rows in {cfg.rows, cfg.rss_rows}:
                inputs[rows] = tmp / f"input-{rows}.jsonl"
                await asyncio.to_thread(_write_input, inputs[rows], rows)
            note(f"backfill: enqueue rate, {cfg.rows} rows vs {cfg.client_rows} enqueues")
            enqueue = await enqueue_rate(cfg, redis, inputs[cfg.rows], tmp, prefix)
            say()
            runs = await through_workers(
                cfg, redis, inputs, tmp, stub_url, stub_pid, prefix, channel
            )
            e2e = _e2e_report(cfg, runs["producer"], runs["cli"])
            say()
            memory = _memory_report(cfg, runs["cli"])
    finally:
        with contextlib.suppress(Exception):
            await _forget_prefix(redis, prefix)
        await redis.aclose()
    problems = [p for c in runs["cli"] for p in c["problems"]]
    for problem in problems:
        say(f"PROBLEM: {problem}")
    floors = {
        "enqueue_ge_20k_rows_per_s": enqueue["floor_met"],
        "end_to_end_ge_90pct_of_producers": e2e["floor_met"],
        "peak_rss_flat_within_5mb": memory["floor_met"],
        "no_errors": not problems and all(p["errors"] == 0 for p in runs["producer"]),
    }
    return {
        "benchmark": "backfill",
        "config": {
            "rows": cfg.rows,
            "rss_rows": cfg.rss_rows,
            "client_rows": cfg.client_rows,
            "rounds": cfg.rounds,
            "e2e_rounds": cfg.e2e_rounds,
            "concurrency": cfg.concurrency,
            "max_jobs": cfg.max_jobs,
            "duration": cfg.duration,
            "warmup": cfg.warmup,
        },
        "enqueue": enqueue,
        "end_to_end": e2e,
        "memory": memory,
        "problems": problems,
        "floors": floors,
        "producer_runs": runs["producer"],
        "cli_runs": runs["cli"],
    }
