"""Hostile requests: what each catalogue entry gets, and the event-loop lag beside it.

In one process, as in a worker: the route job function (decode, validate, walk a
one-model chain at the stub, check the answer) runs each entry of
``llm_router_testing.hostile`` while innocent requests run one after another beside it and a
sleeper measures how late the event loop wakes (every 10 ms). Side by side, in a
child process with a time limit, the same schema and answer go through plain
jsonschema as the worker used it before (Python's ``re``, its default registry):
what that did.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from bench.common import MODEL, PYTHON, note, say, set_offline_env, table
from llm_router_testing.hostile import CATALOGUE, Hostile

LEGACY_LIMIT_S = 5.0
LAG_INTERVAL_S = 0.01

# The checks as they were: jsonschema's own validator class, keywords and registry.
_LEGACY = r"""
import json, sys
import jsonschema
from jsonschema.validators import validator_for
case = json.loads(sys.stdin.read())
try:
    schema = case["schema"]
    cls = validator_for(schema, default=jsonschema.Draft202012Validator)
    cls.check_schema(schema)
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    answer = json.loads(case["answer"]) if case["answer"] is not None else "x"
    error = next(iter(validator.iter_errors(answer)), None)
    print("valid" if error is None else "invalid")
except Exception as exc:
    print(type(exc).__name__)
"""


def legacy(entry: Hostile, answer: str | None) -> tuple[str, float]:
    """What the old checks did with it, and how long they took (killed at the limit)."""
    try:
        payload = json.dumps({"schema": entry.schema, "answer": answer})
    except (ValueError, RecursionError) as exc:
        return f"not JSON for Python: {type(exc).__name__}", 0.0
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [PYTHON, "-c", _LEGACY],
            input=payload,
            capture_output=True,
            text=True,
            timeout=LEGACY_LIMIT_S,
        )
    except subprocess.TimeoutExpired:
        return f"still running after {LEGACY_LIMIT_S:.0f} s (killed)", LEGACY_LIMIT_S
    took = time.perf_counter() - started
    return (done.stdout.strip() or done.stderr.strip().splitlines()[-1])[:40], took


async def run(stub_url: str, run_id: str) -> dict[str, Any]:
    set_offline_env()
    from llm_router.worker.jobs import Finished, RouteJobs
    from llm_router.worker.logs import configure_logging

    configure_logging("WARNING", "console")  # stdout is for the table; the router logs there
    from llm_router.worker.lag import LoopLag, exempt_start_up_objects
    from llm_router.worker.router import Router
    from llm_router.worker.settings import ModelConfig, Settings
    from llm_router_testing.inproc import claimed
    from llm_router_testing.stubs import Behaviour, answer_text

    chain = [ModelConfig(model=MODEL, timeout=30, api_base=stub_url)]
    router = Router(Settings(chains={"default": chain}))
    jobs = RouteJobs(router, router.settings)
    rows: list[list[object]] = []
    entries: list[dict[str, Any]] = []
    all_innocent: list[float] = []

    async def innocent(n: int) -> float:
        request = {"messages": [{"role": "user", "content": f"innocent {n}"}]}
        blob = json.dumps({"t": 1, "f": "route", "a": [request], "k": {}, "et": 1}).encode()
        started = time.perf_counter()
        finished = await jobs.run(claimed(f"innocent-{n}", blob))
        assert isinstance(finished, Finished), finished
        assert finished.result.ok, finished.result
        return time.perf_counter() - started

    async def innocents(stop: asyncio.Event, latencies: list[float]) -> None:
        while not stop.is_set():
            latencies.append(await innocent(len(latencies)))

    await innocent(-1)  # litellm's first call per model pays its lazy imports
    exempt_start_up_objects()  # as the worker does once it is ready
    try:
        for entry in CATALOGUE:
            answer = None if entry.request_side else entry.answer
            if not entry.request_side and entry.behaviour != "echo":
                answer = answer_text(Behaviour(entry.behaviour), "*", "")
            before, before_s = legacy(entry, answer)
            blob = b'{"t":1,"f":"route","a":[%s],"k":{},"et":1}' % entry.wire_text(run_id).encode()
            lag, stop = LoopLag(LAG_INTERVAL_S, warn_after=float("inf")).start(), asyncio.Event()
            latencies: list[float] = []
            helpers = [asyncio.create_task(innocents(stop, latencies))]
            started = time.perf_counter()
            finished = await jobs.run(claimed(f"hostile-{run_id}", blob))
            assert isinstance(finished, Finished), finished
            out = finished.result.model_dump(mode="json")
            took = time.perf_counter() - started
            await asyncio.sleep(0.05)  # let the innocent stream show the tail of it
            stop.set()
            lag.stop()
            await asyncio.gather(*helpers)
            attempts = out["attempts"]
            reason = attempts[0]["reason"] if attempts else out.get("error") or ""
            verdict = f"{out['status']}: {_short_reason(reason)}"
            lag_max = lag.worst * 1000
            inn = [x * 1000 for x in latencies]
            rows.append(
                [entry.name, before, round(before_s, 2), verdict, round(took * 1000, 1),
                 round(lag_max, 1), round(statistics.median(inn), 1) if inn else "-",
                 round(max(inn), 1) if inn else "-", len(inn)]
            )  # fmt: skip
            entries.append(
                {
                    "name": entry.name,
                    "before": before,
                    "before_s": before_s,
                    "now": verdict,
                    "now_ms": took * 1000,
                    "lag_max_ms": lag_max,
                    "lag_samples": lag.samples,
                    "innocent_n": len(inn),
                    "innocent_p50_ms": statistics.median(inn) if inn else None,
                    "innocent_max_ms": max(inn, default=None),
                }
            )
            all_innocent += inn
            note(f"hostile: {entry.name}: {verdict}")
    finally:
        await router.aclose()
    say("Hostile requests: the old checks (plain jsonschema, in a child process) and now")
    say("(the route job in this process, innocent requests beside it, loop lag every 10 ms)")
    headers = ["entry", "before", "before s", "now", "now ms", "lag max ms"]
    say(table([*headers, "innocent p50", "innocent max", "n"], rows))
    all_lag = [e["lag_max_ms"] for e in entries]
    say(
        f"worst loop lag over the catalogue: {max(all_lag):.1f} ms; innocent requests: "
        f"{len(all_innocent)}, p50 {statistics.median(all_innocent):.1f} ms, "
        f"max {max(all_innocent):.1f} ms"
    )
    return {
        "benchmark": "hostile",
        "entries": entries,
        "worst_lag_ms": max(all_lag),
        "innocent_p50_ms": statistics.median(all_innocent),
        "innocent_max_ms": max(all_innocent),
        "floors": {"lag_under_250ms": max(all_lag) < 250},
    }


def _short_reason(reason: str) -> str:
    reason = reason.removeprefix("invalid request: ").removeprefix("schema: Value error, ")
    return reason.removeprefix("request: Value error, ")[:48]


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run it as: python -m bench hostile")
