"""Reading a cProfile: CPU per job by package, and per-thread CPU of this process."""

from __future__ import annotations

import io
import os
import pstats
import re
from collections import defaultdict
from pathlib import Path

from bench.common import table

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_SITE = re.compile(r"site-packages/([^/]+)/")
_STDLIB = re.compile(r"/lib/python3\.\d+/([^/]+?)(?:\.py)?(?:/|$)")
_OURS = re.compile(r"/(llm_router/(?:client|worker)/[^/]+?)\.py$")
IDLE = "(idle: epoll wait)"


def package(filename: str) -> str:
    if m := _OURS.search(filename):
        return m[1].replace("/", ".")
    if "/bench/" in filename:
        return "bench (instrumentation)"
    if m := _SITE.search(filename):
        return m[1]
    if m := _STDLIB.search(filename):
        return "stdlib " + m[1]
    return "other"


def by_package(stats: pstats.Stats) -> dict[str, float]:
    """Self time (s) per package; a C builtin's time goes to the packages that called it."""
    totals: dict[str, float] = defaultdict(float)
    raw = stats.stats  # type: ignore[attr-defined]
    for (filename, _line, name), (_cc, _nc, tottime, _ct, callers) in raw.items():
        if "epoll" in name and "poll" in name:
            totals[IDLE] += tottime
        elif filename == "~":
            for caller, edge in callers.items():
                totals[package(caller[0]) if caller[0] != "~" else "other"] += edge[2]
        else:
            totals[package(filename)] += tottime
    return dict(totals)


def package_table(columns: dict[str, tuple[dict[str, float], int]], top: int = 25) -> str:
    """ms of CPU per job per package, one column per profiled pass (name -> totals, jobs)."""
    names = sorted(
        {p for totals, _ in columns.values() for p in totals if p != IDLE},
        key=lambda p: -max(t.get(p, 0.0) / max(n, 1) for t, n in columns.values()),
    )
    rows: list[list[object]] = []
    for p in names[:top]:
        rows.append([p, *(t.get(p, 0.0) / max(n, 1) * 1000 for t, n in columns.values())])
    rows.append(
        [
            "TOTAL (profiled thread, busy)",
            *(
                sum(v for k, v in t.items() if k != IDLE) / max(n, 1) * 1000
                for t, n in columns.values()
            ),
        ]
    )
    return table(["package (ms CPU per job)", *columns], rows)


def top_functions(stats: pstats.Stats, top: int) -> str:
    buffer = io.StringIO()
    stats.stream = buffer  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return buffer.getvalue()


def thread_cpu() -> dict[str, float]:
    """CPU seconds per thread name of this process (threads of one name added up)."""
    out: dict[str, float] = defaultdict(float)
    for task in Path("/proc/self/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            raw = (task / "stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        name = re.sub(r"[_-]?\d+$", "", comm) or comm
        out[name] += (int(fields[11]) + int(fields[12])) / _CLK_TCK
    return dict(out)


def thread_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after if after[k] - before.get(k, 0.0) > 0}
