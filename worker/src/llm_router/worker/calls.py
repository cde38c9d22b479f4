"""One model call through litellm, under a deadline the worker enforces itself."""

from __future__ import annotations

import asyncio
import contextlib
import re
import weakref
from collections.abc import Iterable
from contextvars import ContextVar
from typing import Any

# litellm runs offline: the package's __init__ set its environment before this import.
import httpx
import litellm
from litellm.llms.custom_httpx.http_handler import AsyncHTTPHandler

from llm_router.worker.costs import Usage, usage_of
from llm_router.worker.retries import MIN_TRY_S, retry_delay
from llm_router.worker.settings import ModelConfig

litellm.suppress_debug_info = True
# Token counting costs CPU on every call and we do not use its numbers.
litellm.disable_token_counter = True

_REASON_LIMIT = 300

try:
    # litellm runs a success handler (callbacks, spend and cost bookkeeping) on the event
    # loop after every call, about 1 ms of CPU between the answer and our reply. We use
    # none of it; litellm skips it for calls it marks internal.
    from litellm._internal_context import internal_sub_call as _without_litellm_logging
except ImportError:  # pragma: no cover - another litellm version
    _without_litellm_logging = contextlib.nullcontext  # type: ignore[assignment]


# litellm keeps nothing of Ollama's timings; a response hook on our own client for
# Ollama reads ``load_duration`` from the body for the call that is running.
_LOAD_DURATION = re.compile(rb'"load_duration"\s*:\s*(\d+)')
_ollama_body: ContextVar[dict[str, int] | None] = ContextVar("ollama_body", default=None)
_last_load_ms: ContextVar[int | None] = ContextVar("last_load_ms", default=None)
_last_retries: ContextVar[tuple[int, str | None]] = ContextVar("last_retries", default=(0, None))
_last_usage: ContextVar[Usage | None] = ContextVar("last_usage", default=None)
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncHTTPHandler] = (
    weakref.WeakKeyDictionary()
)


async def _read_load_duration(response: httpx.Response) -> None:
    holder = _ollama_body.get()
    if holder is None or not response.request.url.path.endswith(("/api/chat", "/api/generate")):
        return
    await response.aread()
    found = _LOAD_DURATION.search(response.content[-4096:])
    if found:
        holder["load_ns"] = int(found[1])


def _ollama_client() -> AsyncHTTPHandler:
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        client = _clients[loop] = AsyncHTTPHandler(event_hooks={"response": [_read_load_duration]})
    return client


def last_load_ms() -> int | None:
    """The load time Ollama reported for the last :func:`call_model` of this task."""
    return _last_load_ms.get()


def last_usage() -> Usage | None:
    """What the last :func:`call_model` of this task used and cost, if it answered."""
    return _last_usage.get()


def last_retries() -> tuple[int, str | None]:
    """How often the last :func:`call_model` of this task retried, and the last error."""
    return _last_retries.get()


class ModelCallError(Exception):
    """A model gave no usable text; ``reason`` goes into the attempt log.

    ``unwell``: the failure says the model or its server is not working (what the
    circuit breaker counts), not that this one request or answer was bad.
    """

    def __init__(self, reason: str, *, unwell: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unwell = unwell


def is_unwell(exc: BaseException) -> bool:
    """Deadline passed, connection refused or reset, HTTP 5xx, 404 unknown model, 401/403."""
    if isinstance(exc, TimeoutError | litellm.exceptions.Timeout | ConnectionError):
        return True
    if isinstance(exc, litellm.exceptions.APIConnectionError):
        return True
    status = getattr(exc, "status_code", None)
    return isinstance(status, int) and (status >= 500 or status in (401, 403, 404))


def register_local_models(models: Iterable[ModelConfig]) -> None:
    """Give litellm a price row per local model.

    Without one, litellm scans its whole price map twice a call and POSTs
    Ollama's ``/api/show`` synchronously on the event loop.
    """
    rows: dict[str, Any] = {}
    for cfg in models:
        if cfg.is_local:
            rows[cfg.model] = {
                "litellm_provider": cfg.provider,
                "mode": "chat",
                "input_cost_per_token": 0.0,
                "output_cost_per_token": 0.0,
                "max_tokens": 8192,
                "max_input_tokens": 32768,
                "max_output_tokens": 8192,
            }
    if rows:
        litellm.register_model(rows)


def warm_up() -> None:
    """Pay litellm's lazy imports at start-up, not on the first job's clock."""
    # litellm's own loader points tiktoken at the tokenizer files litellm ships; a bare
    # tiktoken.get_encoding() would try to download them from the internet.
    import litellm.litellm_core_utils.default_encoding
    import litellm.proxy._types  # noqa: F401


def is_anthropic(cfg: ModelConfig) -> bool:
    return cfg.provider == "anthropic" or cfg.model.startswith("claude")


def cacheable_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mark the last system message as a prompt-cache breakpoint: Anthropic caches the
    prefix up to it (tools, then system), which every job sharing it then reads at a
    tenth of the input price. A prefix below the model's minimum is not cached."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "system"), default=None)
    if last is None:
        return messages
    content = messages[last].get("content")
    ephemeral = {"cache_control": {"type": "ephemeral"}}
    if isinstance(content, str):
        blocks = [{"type": "text", "text": content, **ephemeral}]
    elif isinstance(content, list) and content and isinstance(content[-1], dict):
        blocks = [*content[:-1], {**content[-1], **ephemeral}]
    else:
        return messages
    return [*messages[:last], {**messages[last], "content": blocks}, *messages[last + 1 :]]


def max_output_tokens(cfg: ModelConfig, anthropic_max_tokens: int) -> int:
    """The most a call may answer, for the budget's worst case."""
    for name in ("max_tokens", "max_completion_tokens"):
        value = cfg.params.get(name)
        if isinstance(value, int) and value > 0:
            return value
    if is_anthropic(cfg):
        return anthropic_max_tokens
    try:
        found = litellm.get_model_info(cfg.model).get("max_output_tokens")
    except Exception:
        found = None
    return found if isinstance(found, int) and found > 0 else 4096


def build_kwargs(
    cfg: ModelConfig,
    messages: list[dict[str, Any]],
    schema: dict[str, Any] | None,
    anthropic_max_tokens: int,
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "model": cfg.model,
        "messages": messages,
        "timeout": cfg.timeout,
        "num_retries": 0,
    }
    if cfg.api_base:
        kwargs["api_base"] = cfg.api_base
    if cfg.api_key is not None:
        kwargs["api_key"] = cfg.api_key.get_secret_value()
    if is_anthropic(cfg):
        kwargs["max_tokens"] = anthropic_max_tokens
        if cfg.cache_prompt:
            kwargs["messages"] = cacheable_system(messages)
    if cfg.is_local and cfg.keep_alive is not None:
        kwargs["keep_alive"] = cfg.keep_alive
    if schema is not None and cfg.structured_output:
        kwargs["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": schema},
        }
    kwargs.update(cfg.params)
    return kwargs


async def _call_with_retries(cfg: ModelConfig, kwargs: dict[str, Any]) -> Any:
    """Repeat a transient failure (:mod:`~llm_router.worker.retries`) while the deadline,
    which the caller enforces around all tries, leaves room for the wait and a try."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + cfg.timeout
    retries = 0
    while True:
        try:
            with _without_litellm_logging():
                return await litellm.acompletion(**kwargs)
        except Exception as exc:
            delay = retry_delay(exc, retries) if retries < cfg.retries else None
            if delay is None or loop.time() + delay + MIN_TRY_S > deadline:
                raise
            retries += 1
            _last_retries.set((retries, _reason(exc)))
            await asyncio.sleep(delay)
            kwargs["timeout"] = max(MIN_TRY_S, deadline - loop.time())


def _reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= _REASON_LIMIT else text[: _REASON_LIMIT - 1] + "…"


async def call_model(
    cfg: ModelConfig,
    messages: list[dict[str, Any]],
    schema: dict[str, Any] | None = None,
    *,
    anthropic_max_tokens: int = 4096,
) -> str:
    """Return the model's text or raise :class:`ModelCallError` with the reason."""
    kwargs = build_kwargs(cfg, messages, schema, anthropic_max_tokens)
    holder: dict[str, int] = {}
    _last_load_ms.set(None)
    if cfg.provider == "ollama_chat" and "client" not in kwargs:
        kwargs["client"] = _ollama_client()
        _ollama_body.set(holder)
    _last_retries.set((0, None))
    _last_usage.set(None)
    try:
        async with asyncio.timeout(cfg.timeout):
            response = await _call_with_retries(cfg, kwargs)
    except TimeoutError:
        raise ModelCallError(f"Timeout after {cfg.timeout}s", unwell=True) from None
    except litellm.exceptions.Timeout:
        raise ModelCallError(f"Timeout after {cfg.timeout}s (provider)", unwell=True) from None
    except Exception as exc:
        raise ModelCallError(_reason(exc), unwell=is_unwell(exc)) from None
    finally:
        _ollama_body.set(None)
        if "load_ns" in holder:
            _last_load_ms.set(round(holder["load_ns"] / 1e6))
    _last_usage.set(usage_of(cfg.model, response, free=cfg.is_local))  # an empty answer costs too
    try:
        text = response.choices[0].message.content
    except (AttributeError, IndexError) as exc:
        raise ModelCallError(f"MalformedResponse: {exc}") from None
    if not isinstance(text, str) or not text.strip():
        raise ModelCallError("EmptyResponse: the model returned no text")
    return text.strip()
