"""``llm-router costs``: what each chain and model spent per UTC day, for people and scripts."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from llm_router.client.spend import DaySpend


def as_json(days: list[DaySpend]) -> str:
    """An array of days, today first: ``{"day", "total_usd", "chains": {...}, "models": {...}}``."""
    rows: list[dict[str, Any]] = [
        {
            "day": d.day,
            "total_usd": round(d.total_usd, 9),
            "chains": {name: dataclasses.asdict(c) for name, c in sorted(d.chains.items())},
            "models": {name: dataclasses.asdict(m) for name, m in sorted(d.models.items())},
        }
        for d in days
    ]
    return json.dumps(rows, indent=2)


def usd(value: float) -> str:
    return f"${value:,.4f}"


def budget_used(spent: float, budget: float | None) -> str:
    """The budget and the share of it spent, as both reports show it."""
    if budget is None:
        return "—"
    if budget <= 0:
        return f"{usd(budget)} (cloud off)"
    return f"{usd(budget)} ({spent / budget:.0%})"


def render(days: list[DaySpend], console: Console) -> None:
    """One table of chains and one of models; days with nothing spent or called are left out."""
    active = [d for d in days if d.chains or d.models]
    if not active:
        console.print(f"No calls counted in the last {len(days)} day(s) (UTC).")
        return
    chains = Table(title="Spend per chain (UTC days)", title_justify="left")
    for name in ("day", "chain", "calls", "spent", "budget (used)", "held now"):
        chains.add_column(name, justify="left" if name in ("day", "chain") else "right")
    models = Table(title="Usage per model", title_justify="left")
    for name in ("day", "model", "calls", "input", "output", "cache read", "cache write", "cost"):
        models.add_column(name, justify="left" if name in ("day", "model") else "right")
    for d in active:
        for name, c in sorted(d.chains.items()):
            held = usd(c.reserved_usd) if c.reserved_usd else ""
            chains.add_row(
                d.day,
                name,
                f"{c.calls:,}",
                usd(c.spent_usd),
                budget_used(c.spent_usd, c.budget_usd),
                held,
            )
        for name, m in sorted(d.models.items()):
            models.add_row(
                d.day,
                name,
                f"{m.calls:,}",
                f"{m.input_tokens:,}",
                f"{m.output_tokens:,}",
                f"{m.cache_read_input_tokens:,}",
                f"{m.cache_creation_input_tokens:,}",
                usd(m.cost_usd),
            )
    console.print(chains)
    console.print(models)
    total = sum(d.total_usd for d in active)
    console.print(f"Total over {len(days)} day(s): {usd(total)}")
