"""One model call through litellm, under a deadline the worker enforces itself."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import weakref
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

# litellm runs offline: the package's __init__ set its environment before this import.
import httpx
import litellm
from litellm.llms.custom_httpx.http_handler import AsyncHTTPHandler

from llm_router.worker.checks import WINDOW_FULL, Finish
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


# litellm keeps little of what the provider said about how an answer ended (Ollama's
# ``load_duration``, Anthropic's ``stop_details``; in JSON mode it even rewrites Anthropic's
# ``stop_reason`` to "stop"). A response hook on our own client reads those fields from the
# end of the body of the call that is running; the holder lives only for that call.
_TAIL_BYTES = 8192
_RAW_FIELDS = {
    "load_ns": re.compile(rb'"load_duration"\s*:\s*(\d+)'),
    "done_reason": re.compile(rb'"done_reason"\s*:\s*"([a-z_]{1,40})"'),
    "stop_reason": re.compile(rb'"stop_reason"\s*:\s*"([a-z_]{1,40})"'),
    # A flat object whose strings may hold braces; the last one in the body is the message's.
    "stop_details": re.compile(rb'"stop_details"\s*:\s*(\{(?:[^{}"]|"(?:[^"\\]|\\.)*")*\})'),
}
_raw_body: ContextVar[dict[str, bytes] | None] = ContextVar("raw_body", default=None)
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncHTTPHandler] = (
    weakref.WeakKeyDictionary()
)


async def _read_raw_fields(response: httpx.Response) -> None:
    holder = _raw_body.get()
    if holder is None or response.status_code >= 400:
        return
    await response.aread()
    tail = response.content[-_TAIL_BYTES:]
    for name, pattern in _RAW_FIELDS.items():
        found = pattern.findall(tail)
        if found:
            holder[name] = found[-1]


def _http_client() -> AsyncHTTPHandler:
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        client = _clients[loop] = AsyncHTTPHandler(event_hooks={"response": [_read_raw_fields]})
    return client


@dataclass(frozen=True, slots=True)
class Reply:
    """What one model call gave back: its text (stripped, perhaps empty) and how it went."""

    text: str
    finish: Finish = field(default_factory=Finish)
    usage: Usage | None = None
    load_ms: int | None = None
    retries: int = 0
    retry_error: str | None = None


class ModelCallError(Exception):
    """A model gave no answer; ``reason`` goes into the attempt log.

    ``unwell``: the failure says the model or its server is not working (what the
    circuit breaker counts), not that this one request was bad. ``busy``: the server
    turned the call away under load (Ollama's full queue, a model still loading): the
    model is skipped, and the breaker does not count it. ``unreached``: no connection
    (refused, reset, unknown host): the request never got to a model, so another
    deployment of it may take it at once.
    """

    def __init__(
        self,
        reason: str,
        *,
        unwell: bool = False,
        busy: bool = False,
        retries: int = 0,
        retry_error: str | None = None,
        load_ms: int | None = None,
        usage: Usage | None = None,
        unreached: bool = False,
        window: int | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unwell = unwell
        self.busy = busy
        self.unreached = unreached
        self.retries = retries
        self.retry_error = retry_error
        self.load_ms = load_ms
        self.usage = usage
        #: The context window the server named in refusing a prompt too long for it.
        self.window = window


#: A 503 that means "come back later", not "broken": Ollama's full queue (server/sched.go)
#: and llama.cpp's server while it loads its model.
_BUSY = re.compile(r"server busy|loading model", re.IGNORECASE)


def is_busy(exc: BaseException) -> bool:
    return getattr(exc, "status_code", None) == 503 and _BUSY.search(str(exc)) is not None


#: A server refusing a prompt over its window names the window: OpenAI's words (also
#: llama-cpp-python's server and vLLM), and llama.cpp's server's.
_WINDOW_NAMED = re.compile(
    r"maximum context length is (\d+) tokens|available context size \((\d+) tokens\)"
)


def window_named(exc: BaseException) -> int | None:
    """The context window a refusal names, for servers that say it nowhere else."""
    if (found := _WINDOW_NAMED.search(str(exc))) is None:
        return None
    return int(found.group(1) or found.group(2))


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
                "cache_creation_input_token_cost": 0.0,
                "cache_read_input_token_cost": 0.0,
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
    if cfg.output_limit is not None:
        return cfg.output_limit
    if cfg.is_anthropic:
        return anthropic_max_tokens
    try:
        found = litellm.get_model_info(cfg.model).get("max_output_tokens")
    except Exception:
        found = None
    return found if isinstance(found, int) and found > 0 else 4096


#: The key sent to a local OpenAI-compatible server that was given none (they ask for one
#: only when started with ``--api-key``).
LOCAL_API_KEY = "no-key"


def response_format(cfg: ModelConfig, schema: dict[str, Any]) -> dict[str, Any]:
    """The schema in the form the model's server takes: OpenAI's ``json_schema`` (litellm
    turns it into Ollama's ``format``), or ``json_object`` with the schema beside it, the
    only form llama-cpp-python's server constrains to (it refuses ``json_schema``)."""
    if cfg.structured_output == "json_object":
        return {"type": "json_object", "schema": schema}
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


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
    elif cfg.is_local and not cfg.is_ollama:
        # Else litellm would send the provider's variable (a real OPENAI_API_KEY) to a
        # local server, or refuse to call without one.
        kwargs["api_key"] = LOCAL_API_KEY
    if cfg.is_anthropic:
        kwargs["max_tokens"] = anthropic_max_tokens
        if cfg.cache_prompt:
            kwargs["messages"] = cacheable_system(messages)
    if cfg.is_ollama and cfg.keep_alive is not None:
        kwargs["keep_alive"] = cfg.keep_alive
    if schema is not None and cfg.structured_output:
        kwargs["response_format"] = response_format(cfg, schema)
    kwargs.update(cfg.params)
    return kwargs


class _Tries:
    """Retries of one call so far, and the error the last one answered."""

    __slots__ = ("count", "last_error")

    def __init__(self) -> None:
        self.count = 0
        self.last_error: str | None = None


async def _call_with_retries(cfg: ModelConfig, kwargs: dict[str, Any], tries: _Tries) -> Any:
    """Repeat a transient failure (:mod:`~llm_router.worker.retries`) while the deadline,
    which the caller enforces around all tries, leaves room for the wait and a try."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + cfg.timeout
    while True:
        try:
            with _without_litellm_logging():
                return await litellm.acompletion(**kwargs)
        except Exception as exc:
            delay = retry_delay(exc, tries.count) if tries.count < cfg.retries else None
            if delay is None or loop.time() + delay + MIN_TRY_S > deadline:
                raise
            tries.count += 1
            tries.last_error = _reason(exc)
            await asyncio.sleep(delay)
            kwargs["timeout"] = max(MIN_TRY_S, deadline - loop.time())


def _reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= _REASON_LIMIT else text[: _REASON_LIMIT - 1] + "…"


def _output_limit(cfg: ModelConfig, kwargs: dict[str, Any]) -> str:
    """What stops a model's answer, in words for a ``Truncated`` reason."""
    for name in ("max_tokens", "max_completion_tokens", "num_predict"):
        value = kwargs.get(name)
        if isinstance(value, int) and value > 0:
            return f"{name} ({value:,})"
    return "the context window" if cfg.is_local else "the model's output limit"


def _stop_details(raw: bytes | None) -> dict[str, Any]:
    if raw is None:
        return {}
    try:
        details = json.loads(raw)
    except ValueError:
        return {}
    return details if isinstance(details, dict) else {}


def _finish(cfg: ModelConfig, kwargs: dict[str, Any], choice: Any, raw: dict[str, bytes]) -> Finish:
    reason = getattr(choice, "finish_reason", None)
    provider = raw.get("stop_reason") or raw.get("done_reason")
    details = _stop_details(raw.get("stop_details"))
    explanation = details.get("explanation") or getattr(choice.message, "refusal", None)
    category = details.get("category")
    finish = Finish(
        reason=reason if isinstance(reason, str) else None,
        provider_reason=provider.decode() if provider else None,
        refusal_category=category if isinstance(category, str) else None,
        refusal_explanation=explanation if isinstance(explanation, str) else None,
    )
    if finish.truncated:
        limit = "the context window" if finish.provider_reason == WINDOW_FULL else None
        return dataclasses.replace(finish, limit=limit or _output_limit(cfg, kwargs))
    return finish


async def call_model(
    cfg: ModelConfig,
    messages: list[dict[str, Any]],
    schema: dict[str, Any] | None = None,
    *,
    anthropic_max_tokens: int = 4096,
) -> Reply:
    """The model's answer and how it ended, or :class:`ModelCallError` with the reason.

    Whether the answer is acceptable (whole, not a refusal, the JSON asked for) is for
    :mod:`~llm_router.worker.checks` to say: an empty or cut-off answer is still a reply.
    """
    kwargs = build_kwargs(cfg, messages, schema, anthropic_max_tokens)
    raw: dict[str, bytes] = {}
    if (cfg.provider == "ollama_chat" or cfg.is_anthropic) and "client" not in kwargs:
        kwargs["client"] = _http_client()
    tries = _Tries()
    error: ModelCallError | None = None
    scope = _raw_body.set(raw)
    try:
        async with asyncio.timeout(cfg.timeout):
            response = await _call_with_retries(cfg, kwargs, tries)
    except TimeoutError:
        error = ModelCallError(f"Timeout after {cfg.timeout}s", unwell=True)
    except litellm.exceptions.Timeout:
        error = ModelCallError(f"Timeout after {cfg.timeout}s (provider)", unwell=True)
    except Exception as exc:
        busy = is_busy(exc)
        reason = f"busy: {_reason(exc)}" if busy else _reason(exc)
        unreached = isinstance(exc, litellm.exceptions.APIConnectionError | ConnectionError)
        error = ModelCallError(
            reason,
            unwell=is_unwell(exc) and not busy,
            busy=busy,
            unreached=unreached,
            window=window_named(exc) if cfg.is_local else None,
        )
    finally:
        _raw_body.reset(scope)
    load_ms = round(int(raw["load_ns"]) / 1e6) if "load_ns" in raw and cfg.is_local else None
    if error is not None:
        error.retries, error.retry_error, error.load_ms = tries.count, tries.last_error, load_ms
        raise error from None
    usage = usage_of(cfg.model, response, free=cfg.is_local)  # an empty answer costs too
    try:
        choice = response.choices[0]
        text = choice.message.content
    except (AttributeError, IndexError) as exc:
        raise ModelCallError(
            f"MalformedResponse: {exc}",
            retries=tries.count,
            retry_error=tries.last_error,
            load_ms=load_ms,
            usage=usage,
        ) from None
    return Reply(
        text=text.strip() if isinstance(text, str) else "",
        finish=_finish(cfg, kwargs, choice, raw),
        usage=usage,
        load_ms=load_ms,
        retries=tries.count,
        retry_error=tries.last_error,
    )
