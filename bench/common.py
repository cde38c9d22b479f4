"""Shared pieces: the chain under test, environments, statistics, tables, output, clean-up."""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
PYTHON = sys.executable

#: A database of its own, so the shared metrics counters of tests on db 0 are never touched.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"
MODEL = "ollama_chat/qwen2.5:7b"
MODEL_TIMEOUT_S = 5.0
PROMPT = "Say hello to the benchmark."
JOB_TIMEOUT_S = 10.0
#: The plain-arq variants: poll delays of both the worker and Job.result() (None = arq's default).
ARQ_POLL: dict[str, float | None] = {"arq_10ms": 0.01, "arq_default": None}

# Keys the worker side writes per job (arq and our metrics), deleted after each benchmark.
PER_JOB_PREFIXES = (
    "arq:result:",
    "arq:job:",
    "arq:in-progress:",
    "arq:retry:",
    "llm_router:metrics:counted:",
)
_COUNTERS_KEY = "llm_router:metrics:counters"
COUNTED_PREFIX = "llm_router:metrics:counted:"
# Take back what this run added to the shared counters; drop a field that reaches zero.
_UNCOUNT_LUA = """
local left = redis.call('HINCRBY', KEYS[1], ARGV[1], -tonumber(ARGV[2]))
if left <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return left
"""


def new_run_id() -> str:
    return time.strftime("%H%M%S") + "-" + uuid.uuid4().hex[:6]


def chains_json(stub_url: str) -> str:
    """The one-model chain every variant routes through: the local model at the stub."""
    chain = [{"model": MODEL, "timeout": MODEL_TIMEOUT_S, "api_base": stub_url}]
    return json.dumps({"default": chain})


def base_env() -> dict[str, str]:
    """This environment without LLM_ROUTER_* (the worker refuses unknown ones), litellm offline."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("LLM_ROUTER_")}
    env["LITELLM_OFFLINE_MODE"] = "true"
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def set_offline_env() -> None:
    """For a bench process that imports litellm itself."""
    os.environ["LITELLM_OFFLINE_MODE"] = "true"
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    for key in [k for k in os.environ if k.upper().startswith("LLM_ROUTER_")]:
        del os.environ[key]


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, from /proc/<pid>/stat (NaN when it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return math.nan
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def cpu_sample(pids: dict[str, int]) -> dict[str, float]:
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


async def redis_pid(redis: Redis) -> int | None:
    """The Redis server's pid, when it runs on this machine (to charge its CPU too)."""
    info: dict[str, Any] = await redis.info("server")
    pid = info.get("process_id")
    if isinstance(pid, int) and not math.isnan(cpu_seconds(pid)):
        return pid
    return None


# ---------------------------------------------------------------- statistics


def quantile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": round(quantile(values, 0.50), 3),
        "p95": round(quantile(values, 0.95), 3),
        "p99": round(quantile(values, 0.99), 3),
        "mean": round(statistics.fmean(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def median(values: Iterable[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return statistics.median(kept) if kept else math.nan


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b and not math.isnan(a) and not math.isnan(b) else math.nan


# ---------------------------------------------------------------- output


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain fixed-width table; the first column left-aligned, the others right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [v.ljust(widths[i]) if i == 0 else v.rjust(widths[i]) for i, v in enumerate(values)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in cells)])


def _cell(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def emit(name: str, data: dict[str, Any]) -> Path:
    """Print the single JSON line and write bench/results/<name>.json."""
    safe = _json_safe(data)
    print(json.dumps(safe, separators=(",", ":")), flush=True)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(safe, indent=2) + "\n")
    return path


def say(text: str = "") -> None:
    print(text, flush=True)


def note(text: str) -> None:
    """Progress goes to stderr, so stdout stays tables and JSON."""
    print(f"[bench] {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- clean-up


async def forget_jobs(redis: Redis, job_ids: Sequence[str]) -> int:
    """Delete every per-job key and take back the counter increments of the jobs that ran.

    A job the worker counted has its metrics marker (a backfill deletes results as it
    writes them, so the marker, not the result, says it ran) and was counted once as a
    success (the stub always answers); returns how many that was.
    """
    counted = 0
    ids = [j for j in job_ids if j]
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        counted += int(await redis.exists(*(COUNTED_PREFIX + j for j in chunk)))
        await redis.delete(*(prefix + j for j in chunk for prefix in PER_JOB_PREFIXES))
    if counted > 0:
        await redis.eval(_UNCOUNT_LUA, 1, _COUNTERS_KEY, f"{MODEL}|success", str(counted))  # type: ignore[misc]
    return counted


async def forget_keys(redis: Redis, keys: Iterable[str]) -> None:
    kept = list(keys)
    if kept:
        await redis.delete(*kept)


def queue_keys(queue: str) -> list[str]:
    """The keys a queue leaves behind: the queue, our wake-up list and idle set, arq's
    health check; and the same for the batch queue its workers serve beside it."""
    own = [queue, f"{queue}:wake", f"{queue}:idle", f"{queue}:health-check"]
    return [*own, f"{queue}:batch", f"{queue}:batch:wake"]


# ---------------------------------------------------------------- sequential timed jobs

#: One timed job: notes its id in the list as soon as it is enqueued; returns (total, chain) ms.
Measure = Callable[[list[str]], Awaitable[tuple[float, float]]]


@dataclass
class Samples:
    total: list[float] = field(default_factory=list)
    chain: list[float] = field(default_factory=list)
    overhead: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)
    truncated: bool = False


async def timed_jobs(measure: Measure, count: int, into: Samples, *, record: bool) -> None:
    """``count`` sequential jobs, bounded in time as well as in count."""
    deadline = time.monotonic() + count * 3.0 + 60
    for _ in range(count):
        if time.monotonic() > deadline:
            into.truncated = True
            return
        try:
            total, chain = await measure(into.job_ids)
        except Exception as exc:
            into.errors.append(f"{type(exc).__name__}: {exc}"[:300])
            continue
        if record:
            into.total.append(total)
            into.chain.append(chain)
            into.overhead.append(total - chain)


def shares(total: int, rounds: int) -> list[int]:
    return [total // rounds + (1 if i < total % rounds else 0) for i in range(rounds)]
