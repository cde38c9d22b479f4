"""The prompt-token estimate (``llm_router.worker.windows``) against real tokenizers.

For each sample text (``llm_router_testing/texts``: English and Polish prose, Python code, JSON)
and each tokenizer litellm ships, the estimate over the real count: above 1 the
estimate is conservative (a prompt is skipped a little early), below 1 it under-counts
(a prompt might reach a model whose window it overflows). Also the estimate's cost,
in microseconds of CPU per kilobyte, against the cheapest real tokenizer's.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.common import say, table
from llm_router.worker.windows import text_tokens
from llm_router_testing.tokenizers import sample_texts, tokenizers

#: Texts in the Latin script, which the floor holds for every tokenizer.
LATIN = ("english", "polish", "code", "json", "json (compact)")


def _us_per_kb(count: Any, text: str, repeat: int = 20) -> float:
    kb = len(text.encode()) / 1000
    times = []
    for _ in range(repeat):
        start = time.process_time()
        count(text)
        times.append(time.process_time() - start)
    return statistics.median(times) * 1e6 / kb


def run() -> dict[str, Any]:
    counts = tokenizers()
    texts = sample_texts()
    ratios: dict[str, dict[str, float]] = {}
    rows = []
    for name, text in texts.items():
        estimate = text_tokens(text)
        ratios[name] = {t: round(estimate / count(text), 3) for t, count in counts.items()}
        rows.append([name, len(text), estimate, *ratios[name].values()])
    say("Token estimate / real tokens, per text and tokenizer (>= 1: conservative)")
    say(table(["text", "chars", "estimate", *counts], rows))
    every = [r for per_text in ratios.values() for r in per_text.values()]
    latin = [r for name in LATIN for r in ratios[name].values()]
    lowest, highest = min(every), max(every)
    big = "\n".join(texts.values()) * 20
    cost = {"estimate": round(_us_per_kb(text_tokens, big), 2)}
    cost |= {t: round(_us_per_kb(c, big, repeat=5), 2) for t, c in counts.items()}
    say(f"CPU per KB of text (median of repeats, {len(big) // 1000} KB): " + str(cost))
    say(f"lowest ratio {lowest:.2f}, highest {highest:.2f}; Latin script {min(latin):.2f}")
    return {
        "benchmark": "tokens",
        "ratios": ratios,
        "lowest": lowest,
        "highest": highest,
        "us_per_kb": cost,
        "floors": {"latin_script_at_least_0_9": min(latin) >= 0.9},
    }
