"""What one model call used and cost, from litellm's bundled (offline) price map.

A job that falls back to the cloud costs money; every attempt says how much, so the
result, the metrics event and later budgets can count it. Local models are registered
at zero price (:func:`~llm_router.worker.calls.register_local_models`); a model whose
price litellm does not know costs 0 and is logged once as ``price_unknown``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import litellm
import structlog

log = structlog.get_logger("llm_router.costs")

_unpriced: set[str] = set()


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens as the provider counted them; ``input_tokens`` excludes the cached part."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cost_usd: float = 0.0


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def usage_of(model: str, response: Any, *, free: bool = False) -> Usage:
    """The response's usage and its price (0 when ``free``: a local model); never raises."""
    usage = getattr(response, "usage", None)
    prompt = _count(getattr(usage, "prompt_tokens", 0))
    read = _count(getattr(usage, "cache_read_input_tokens", 0))
    created = _count(getattr(usage, "cache_creation_input_tokens", 0))
    return Usage(
        input_tokens=max(0, prompt - read - created),  # litellm adds the cached part in
        output_tokens=_count(getattr(usage, "completion_tokens", 0)),
        cache_read_input_tokens=read,
        cache_creation_input_tokens=created,
        cost_usd=0.0 if free else cost_of(model, response),
    )


def cost_of(model: str, response: Any) -> float:
    try:
        cost = float(litellm.completion_cost(completion_response=response, model=model))
    except Exception as exc:  # litellm raises for a model it has no price for
        if model not in _unpriced:
            _unpriced.add(model)
            log.warning("price_unknown", model=model, error=str(exc)[:200])
        return 0.0
    return round(cost, 12) if cost >= 0 else 0.0  # no float noise in results and events


#: Tokens a request's framing may add beyond its text (roles, a JSON-mode tool, ...).
FRAMING_TOKENS = 512


def worst_case_usd(model: str, prompt_bytes: int, max_output_tokens: int) -> float:
    """An upper bound of one call's price: no tokenizer makes more tokens than bytes, the
    whole prompt may be written to the prompt cache, and the answer may use every
    ``max_tokens``. Unknown prices bound at 0, as they are counted."""
    return _worst_case(model, prompt_bytes, max_output_tokens, _real_time_price)


def _worst_case(
    model: str,
    prompt_bytes: int,
    max_output_tokens: int,
    price: Callable[[dict[str, Any], str], float],
) -> float:
    try:
        info = dict(litellm.get_model_info(model))
    except Exception:
        return 0.0
    per_input = max(
        price(info, "input_cost_per_token"), price(info, "cache_creation_input_token_cost")
    )
    per_output = price(info, "output_cost_per_token")
    return (prompt_bytes + FRAMING_TOKENS) * per_input + max_output_tokens * per_output


def _real_time_price(info: dict[str, Any], field: str) -> float:
    return float(info.get(field) or 0.0)


#: What a Message Batch costs against a real-time call, where litellm's price map gives
#: no ``*_batches`` price of its own (Anthropic: half, cache reads and writes included).
BATCH_DISCOUNT = 0.5
_BATCH_PRICES = (
    ("input_cost_per_token", "input_tokens"),
    ("output_cost_per_token", "output_tokens"),
    ("cache_read_input_token_cost", "cache_read_input_tokens"),
    ("cache_creation_input_token_cost", "cache_creation_input_tokens"),
)


def _batch_price(info: dict[str, Any], field: str) -> float:
    own = info.get(f"{field}_batches")
    if isinstance(own, int | float) and own >= 0:
        return float(own)
    return float(info.get(field) or 0.0) * BATCH_DISCOUNT


def batch_usage(model: str, tokens: dict[str, int]) -> Usage:
    """A batch answer's tokens at the batch price (``input_tokens`` excludes the cached
    part, as the Messages API counts it); unknown prices cost 0, as real-time ones do."""
    counts = {name: _count(tokens.get(name, 0)) for _, name in _BATCH_PRICES}
    try:
        info = dict(litellm.get_model_info(model))
    except Exception:
        info = {}
    cost = sum(_batch_price(info, price) * counts[name] for price, name in _BATCH_PRICES)
    return Usage(**counts, cost_usd=round(cost, 12))


def worst_case_batch_usd(model: str, prompt_bytes: int, max_output_tokens: int) -> float:
    """:func:`worst_case_usd` at the batch price."""
    return _worst_case(model, prompt_bytes, max_output_tokens, _batch_price)
