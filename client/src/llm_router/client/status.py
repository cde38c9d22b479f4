"""``llm-router status``: the fleet on one screen — workers, queues, models, breakers, spend.

Everything comes from what workers already leave in Redis: their heartbeats
(:mod:`llm_router.client.heartbeats`), the queues' sorted sets, the shared metrics
counters, the shared circuit-breaker hashes and today's spend hash. A leased job
stays in its queue's sorted set while it runs, so a queue's *pending* jobs are its
depth minus the jobs the heartbeats report running from it.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from llm_router.client.costs import budget_used, usd
from llm_router.client.counters import OUTCOMES, ModelCounts, cache_hits, parse_counters
from llm_router.client.heartbeats import Heartbeat, live_workers
from llm_router.client.keys import (
    BREAKER_PREFIX,
    METRICS_COUNTERS_KEY,
    PARKED_SCORE_MS,
    MsgBatchKeys,
)
from llm_router.client.progress import human_seconds
from llm_router.client.server import ServerState, best_known, read_server, summary
from llm_router.client.spend import DaySpend, read_days


@dataclass
class QueueDepth:
    depth: int
    running: int
    #: Jobs parked until their Message Batch answers (they stay in the queue, far ahead).
    parked: int = 0

    @property
    def pending(self) -> int:
        return max(0, self.depth - self.running - self.parked)


@dataclass
class Breaker:
    state: str
    #: ``redis``: the shared hash every worker uses; ``heartbeat``: as workers last saw it.
    source: str
    failures: int | None = None
    opened_at: float | None = None
    workers: list[str] = field(default_factory=list)


@dataclass
class Status:
    at: float
    workers: list[Heartbeat]
    queues: dict[str, QueueDepth]
    models: dict[str, ModelCounts]
    breakers: dict[str, Breaker]
    spend_today: DaySpend
    server: ServerState = field(default_factory=ServerState)
    #: Message Batches sent and not yet brought back.
    open_batches: int = 0
    #: Jobs answered from the response cache, all time.
    cache_hits: int = 0

    @property
    def in_flight(self) -> int:
        return sum(b.running_total for b in self.workers)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def merge_breakers(
    shared: dict[str, dict[Any, Any]], workers: list[Heartbeat]
) -> dict[str, Breaker]:
    """The shared hashes (by endpoint), then what workers report for models no hash covers."""
    breakers: dict[str, Breaker] = {}
    for endpoint, raw in sorted(shared.items()):
        fields = {_text(k): _text(v) for k, v in raw.items()}
        failures = fields.get("failures", "")
        opened = fields.get("opened", "")
        breakers[endpoint] = Breaker(
            state=fields.get("state", "closed"),
            source="redis",
            failures=int(failures) if failures.isdigit() else None,
            opened_at=int(opened) / 1000 if opened.isdigit() else None,
        )
    # A heartbeat names a model, or model@server for one of its deployments.
    covered = {endpoint.partition("@")[0] for endpoint in breakers} | set(breakers)
    for beat in workers:
        for model, state in sorted(beat.breakers.items()):
            if model in covered:
                continue
            seen = breakers.setdefault(model, Breaker(state=state, source="heartbeat"))
            if state != "closed":
                seen.state = state  # the worst any worker saw
            seen.workers.append(beat.worker_id)
    return breakers


async def _breaker_hashes(redis: Redis) -> dict[str, dict[Any, Any]]:
    names = sorted(
        {_text(key) async for key in redis.scan_iter(match=BREAKER_PREFIX + "*", count=1000)}
    )
    if not names:
        return {}
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hgetall(name)
        raws: list[Any] = await pipe.execute(raise_on_error=False)
    return {
        name.removeprefix(BREAKER_PREFIX): raw
        for name, raw in zip(names, raws, strict=True)
        if isinstance(raw, dict) and raw  # not a hash: not a breaker
    }


def running_on(workers: list[Heartbeat], queue: str) -> int:
    return sum(b.running.get(queue, 0) for b in workers)


async def collect(redis: Redis, queues: list[str], *, now: float | None = None) -> Status:
    """One look at everything; a few round trips. Raises for Redis being away."""
    at = time.time() if now is None else now
    workers = await live_workers(redis, now_ms=int(at * 1000))
    async with redis.pipeline(transaction=False) as pipe:
        for queue in queues:
            pipe.zcard(queue)
            pipe.zcount(queue, int(at * 1000) + PARKED_SCORE_MS, "+inf")
        for queue in queues:  # only a batch queue has open batches
            pipe.hlen(MsgBatchKeys(queue).open)
        pipe.hgetall(METRICS_COUNTERS_KEY)
        replies: list[Any] = await pipe.execute()
    n = len(queues)
    depths, parked = replies[0 : 2 * n : 2], replies[1 : 2 * n : 2]
    open_batches, counters = sum(replies[2 * n : 3 * n]), replies[-1]
    server = best_known(await read_server(redis, config=True), [b.redis for b in workers])
    return Status(
        at=at,
        workers=workers,
        queues={
            q: QueueDepth(int(d), running_on(workers, q), int(p))
            for q, d, p in zip(queues, depths, parked, strict=True)
        },
        models=parse_counters(counters),
        breakers=merge_breakers(await _breaker_hashes(redis), workers),
        spend_today=(await read_days(redis, 1, now=at))[0],
        server=server,
        open_batches=int(open_batches),
        cache_hits=cache_hits(counters),
    )


# --- JSON ---------------------------------------------------------------------------------


def models_json(models: dict[str, ModelCounts]) -> dict[str, Any]:
    return {name: {**c.model_dump(), "success_rate": c.success_rate} for name, c in models.items()}


def as_json(status: Status) -> dict[str, Any]:
    """``workers`` (their heartbeats), ``queues`` (name: depth, pending, running), ``models``,
    ``breakers``, ``spend_today`` and ``in_flight``."""
    spend = status.spend_today
    return {
        "at": status.at,
        "workers": [
            {**b.model_dump(mode="json"), "running_total": b.running_total} for b in status.workers
        ],
        "in_flight": status.in_flight,
        "queues": {
            name: {"depth": q.depth, "pending": q.pending, "running": q.running, "parked": q.parked}
            for name, q in status.queues.items()
        },
        "open_batches": status.open_batches,
        "cache_hits": status.cache_hits,
        "models": models_json(status.models),
        "breakers": {name: dataclasses.asdict(b) for name, b in status.breakers.items()},
        "spend_today": {
            "day": spend.day,
            "total_usd": round(spend.total_usd, 9),
            "chains": {name: dataclasses.asdict(c) for name, c in sorted(spend.chains.items())},
        },
        "redis": {
            **status.server.as_dict(),
            "problems": status.server.problems(),
            "cautions": status.server.cautions(),
        },
    }


# --- the screen ---------------------------------------------------------------------------


def _ago(at: float | None, now: float) -> str:
    return "—" if at is None else f"{human_seconds(max(0.0, now - at))} ago"


def _rate(rate: float | None) -> str:
    return "—" if rate is None else f"{rate:.1%}"


def _done(beat: Heartbeat) -> str:
    """``ok 17 failed 2``: ``ok`` first, then the rest by name."""
    if not beat.done:
        return "0"
    ordered = sorted(beat.done.items(), key=lambda kv: (kv[0] != "ok", kv[0]))
    return " ".join(f"{status} {n}" for status, n in ordered)


def _table(title: str, *columns: str, right: tuple[str, ...] = ()) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD)
    for name in columns:
        # Cells wrap rather than lose their ends: ids, names and queues must stay readable.
        table.add_column(name, justify="right" if name in right else "left", overflow="fold")
    return table


#: Columns of the workers table a narrow terminal leaves out, least useful first.
_OPTIONAL = ("metrics", "version", "last job", "host:pid")


def workers_table(status: Status, width: int | None = None) -> RenderableType:
    """One row per live worker; on a terminal narrower than the table, the optional
    columns go first, so that the rest stay on one line each."""
    if not status.workers:
        return Text("Workers: none alive (no heartbeat in Redis)", style="bold red")
    rows: list[dict[str, str | Text]] = [
        {
            "id": b.worker_id[:8],
            "host:pid": f"{b.host}:{b.pid}",
            "version": b.version,
            "state": Text(b.state, style="green" if b.state == "serving" else "yellow"),
            "up": human_seconds(max(0.0, status.at - b.started_at)),
            "queues": "\n".join(b.queues),
            "running": f"{b.running_total}/{b.max_jobs}",
            "done": _done(b),
            "last job": _ago(b.last_job_at, status.at),
            "metrics": "—" if b.metrics_port is None else f":{b.metrics_port}",
        }
        for b in status.workers
    ]
    columns = list(rows[0])
    widths = {
        c: max(len(c), *(len(line) for r in rows for line in str(r[c]).splitlines()))
        for c in columns
    }
    for optional in _OPTIONAL:
        if width is None or sum(widths[c] + 3 for c in columns) + 1 <= width:
            break
        columns.remove(optional)
    table = _table(f"Workers ({len(status.workers)} live)", *columns, right=("up", "running"))
    for column in table.columns:
        if column.header not in ("queues", "done"):  # these two wrap when they must
            column.no_wrap, column.min_width = True, widths[str(column.header)]
    for row in rows:
        table.add_row(*(row[c] for c in columns))
    return table


def queues_table(status: Status) -> RenderableType:
    table = _table(
        "Queues", "queue", "depth", "pending", "running", "parked", "serving workers",
        right=("depth", "pending", "running", "parked", "serving workers"),
    )  # fmt: skip
    if status.open_batches:
        table.caption = f"{status.open_batches} Message Batches open"
    for name, q in status.queues.items():
        workers = sum(1 for b in status.workers if b.state == "serving" and name in b.queues)
        table.add_row(
            name,
            str(q.depth),
            str(q.pending),
            str(q.running),
            str(q.parked),
            Text(str(workers), style="" if workers else "bold red"),
        )
    return table


def models_table(models: dict[str, ModelCounts], title: str = "Models (all time)") -> Table:
    table = _table(title, "model", *OUTCOMES, "success rate", right=(*OUTCOMES, "success rate"))
    for name, c in models.items():
        table.add_row(
            name,
            f"{c.success:,}",
            f"{c.fallback:,}",
            f"{c.error:,}",
            f"{c.skipped:,}",
            _rate(c.success_rate),
        )
    return table


def _quiet(b: Breaker) -> bool:
    return b.state == "closed" and not b.failures


def breakers_table(status: Status) -> RenderableType:
    """The breakers that are open, probing or counting failures; the quiet ones counted."""
    shown = {name: b for name, b in status.breakers.items() if not _quiet(b)}
    quiet = len(status.breakers) - len(shown)
    if not shown:
        return Text(f"Breakers: all closed ({quiet} known)" if quiet else "Breakers: all closed")
    title = f"Breakers ({quiet} more closed)" if quiet else "Breakers"
    table = _table(title, "model", "state", "failures", "opened", "seen by", right=("failures",))
    for name, b in shown.items():
        style = {"open": "bold red", "half_open": "yellow"}.get(b.state, "green")
        table.add_row(
            name,
            Text(b.state, style=style),
            "—" if b.failures is None else str(b.failures),
            _ago(b.opened_at, status.at),
            "all (shared)" if b.source == "redis" else ", ".join(w[:8] for w in b.workers),
        )
    return table


def spend_table(spend: DaySpend) -> RenderableType:
    if not spend.chains:
        return Text(f"Spend today ({spend.day} UTC): nothing")
    table = _table(
        f"Spend today ({spend.day} UTC): {usd(spend.total_usd)}",
        "chain",
        "calls",
        "spent",
        "budget (used)",
        right=("calls", "spent", "budget (used)"),
    )
    for name, c in sorted(spend.chains.items()):
        table.add_row(
            name, f"{c.calls:,}", usd(c.spent_usd), budget_used(c.spent_usd, c.budget_usd)
        )
    return table


def header(status: Status) -> Text:
    clock = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status.at))
    serving = sum(1 for b in status.workers if b.state == "serving")
    return Text(
        f"llm-router status at {clock} · {serving} serving of {len(status.workers)} live "
        f"workers · {status.in_flight} jobs in flight"
        + (f" · {status.cache_hits} answered from the cache" if status.cache_hits else ""),
        style="bold",
    )


def redis_lines(state: ServerState) -> Text:
    """What the server is, then what is wrong with it (red) or worth a look (yellow)."""
    text = Text(summary(state))
    for problem in state.problems():
        text.append(f"\n{problem}", style="bold red")
    for caution in state.cautions():
        text.append(f"\n{caution}", style="yellow")
    return text


def render(status: Status, width: int | None = None) -> RenderableType:
    """The whole screen; ``width``: the terminal's, to leave columns out rather than wrap."""
    parts: list[RenderableType] = [header(status), redis_lines(status.server)]
    parts += [workers_table(status, width), queues_table(status)]
    parts.append(models_table(status.models) if status.models else Text("Models: no jobs counted"))
    parts += [breakers_table(status), spend_table(status.spend_today)]
    return Group(*parts)
