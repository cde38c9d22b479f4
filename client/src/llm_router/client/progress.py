"""What ``llm-router backfill`` shows while it runs and when it ends, all on stderr.

On a terminal: a live bar (rows done of total, rows/s, time left) with a line of
counts per model and per failure reason, and a table at the end. Otherwise (a log
file, CI): one plain ``key=value`` line every few seconds and the summary as
``key=value`` lines, so that scripts can read it. The output file is the only data.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, Self, TextIO

from rich.console import Console, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from llm_router.client.backfill import BackfillSummary

PLAIN_EVERY_S = 5.0
_TOP = 6  # models and reasons shown on the live line


class RateMeter:
    """Rows per second over the last ``window`` seconds: the rate that predicts the rest."""

    def __init__(self, window: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, rows: int) -> None:
        now = self._clock()
        samples = self._samples
        samples.append((now, rows))
        while len(samples) > 2 and now - samples[1][0] >= self.window:
            samples.popleft()

    @property
    def rate(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, r0), (t1, r1) = self._samples[0], self._samples[-1]
        return (r1 - r0) / (t1 - t0) if t1 > t0 else 0.0

    def eta(self, remaining: int) -> float | None:
        """Seconds until ``remaining`` rows are done at the current rate; None if unknown."""
        if remaining <= 0:
            return 0.0
        rate = self.rate
        return remaining / rate if rate > 0 else None


def human_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _top(counts: Mapping[str, int]) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def counts_line(s: BackfillSummary) -> str:
    """The live line: outcomes, then the busiest models and the commonest reasons."""
    parts = [
        f"ok {s.ok}",
        f"failed {s.failed}",
        f"invalid {s.invalid}",
        f"skipped {s.already_done}",
        f"in flight {s.in_flight}" + (f" ({s.parked} parked)" if s.parked else ""),
    ]
    line = " · ".join(parts)
    models = _top(s.per_model)
    if models:
        shown = ", ".join(f"{m} {n}" for m, n in models[:_TOP])
        line += f"  │  {shown}" + (" …" if len(models) > _TOP else "")
    reasons = _top(s.per_reason)
    if reasons:
        shown = ", ".join(f"{r} {n}" for r, n in reasons[:_TOP])
        line += f"  │  {shown}" + (" …" if len(reasons) > _TOP else "")
    return line


def summary_pairs(s: BackfillSummary) -> Iterator[tuple[str, str]]:
    """The summary as (key, value): the table's rows and the plain lines."""
    yield "rows", str(s.total)
    yield "ok", str(s.ok)
    yield "failed", str(s.failed)
    yield "invalid", str(s.invalid)
    yield "skipped", str(s.already_done)  # done by an earlier run
    yield "written", str(s.written)
    yield "missing", str(s.missing)
    yield "elapsed_s", f"{s.elapsed_s:.1f}"
    yield "rate", f"{s.rate:.1f}"
    yield "ended", s.ended
    for model, n in _top(s.per_model):
        yield f"model.{model}", str(n)
    for reason, n in _top(s.per_reason):
        yield f"reason.{reason}", str(n)


class ProgressView:
    """Shows a run: entered before it starts, fed snapshots, shown the summary at the end."""

    def start(self) -> None:
        """On entering, before the run starts."""

    def stop(self) -> None:
        """On leaving, also when the run raised."""

    def update(self, summary: BackfillSummary) -> None:
        raise NotImplementedError

    def finish(self, summary: BackfillSummary) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _ProgressWithLine(Progress):
    """A rich Progress with one more line under the bar."""

    def __init__(self, *columns: Any, line: Callable[[], RenderableType], **kwargs: Any) -> None:
        self._line = line  # before Progress's init, which renders once
        super().__init__(*columns, **kwargs)

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        yield self._line()


class TerminalProgress(ProgressView):
    """The live bar and the summary table, for a person at a terminal."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._meter = RateMeter()
        self._line = Text("starting…", style="dim")
        self._progress = _ProgressWithLine(
            TextColumn("[bold]backfill"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("eta {task.fields[eta]}"),
            TimeElapsedColumn(),
            line=lambda: self._line,
            console=self.console,
            refresh_per_second=4,
        )
        self._task = self._progress.add_task("backfill", total=None, rate="", eta="?")

    def start(self) -> None:
        self._progress.start()

    def stop(self) -> None:
        self._progress.stop()

    def update(self, summary: BackfillSummary) -> None:
        self._meter.add(summary.written)
        eta = self._meter.eta(summary.total - summary.done)
        self._progress.update(
            self._task,
            total=summary.total,
            completed=summary.done,
            rate=f"{self._meter.rate:,.1f} rows/s",
            eta=human_seconds(eta),
        )
        self._line = Text(counts_line(summary), style="dim")

    def finish(self, summary: BackfillSummary) -> None:
        self.update(summary)
        self._progress.stop()
        table = Table(title="backfill summary", show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column(justify="right")
        labels = {"skipped": "skipped (already done)", "rate": "rows/s", "elapsed_s": "elapsed"}
        for key, value in summary_pairs(summary):
            if key == "elapsed_s":
                value = human_seconds(summary.elapsed_s)
            kind, _, name = key.partition(".")
            label = f"{kind} {name}" if kind in ("model", "reason") and name else key
            table.add_row(labels.get(key, label), value)
        self.console.print(table)


class PlainProgress(ProgressView):
    """A line every ``every`` seconds and ``key=value`` summary lines, for logs and scripts."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        every: float = PLAIN_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream
        self.every = every
        self._clock = clock
        self._meter = RateMeter(clock=clock)
        self._last: float | None = None

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stderr

    def start(self) -> None:
        self._last = self._clock()

    def line(self, s: BackfillSummary) -> str:
        eta = self._meter.eta(s.total - s.done)
        return (
            f"backfill done={s.done} total={s.total} ok={s.ok} failed={s.failed} "
            f"invalid={s.invalid} rate={self._meter.rate:.1f}/s "
            f"eta={'?' if eta is None else f'{eta:.0f}s'} "
            f"skipped={s.already_done} in_flight={s.in_flight} parked={s.parked}"
        )

    def update(self, summary: BackfillSummary) -> None:
        self._meter.add(summary.written)
        now = self._clock()
        if self._last is None or now - self._last >= self.every:
            self._last = now
            print(self.line(summary), file=self.stream, flush=True)

    def finish(self, summary: BackfillSummary) -> None:
        for key, value in summary_pairs(summary):
            print(f"{key}={value}", file=self.stream)
        self.stream.flush()


def make_progress(console: Console | None = None) -> TerminalProgress | PlainProgress:
    """The bar when stderr is a terminal, plain lines otherwise."""
    console = console or Console(stderr=True)
    return TerminalProgress(console) if console.is_terminal else PlainProgress()
