"""Stub Ollama and Anthropic model servers speaking the real HTTP wire formats.

Tests and the demo need model servers whose answers and failures are chosen per request, with no
GPU or network; matching the real wire formats keeps litellm's real HTTP path under test instead
of a mock. A directive such as ``stub:qwen=http_500`` anywhere in a request's messages picks the
behaviour for models whose name contains the key (``*`` for all). The Ollama routes can also
queue, serialise and cold-load per model the way Ollama's scheduler does, so load tests see what
piha's GPU does to them.

Anthropic's Message Batches routes (``/v1/messages/batches``: create, retrieve, list, cancel,
delete, results) are mounted from :mod:`~llm_router_testing.batches_stub`: half-price work
that waits must be tested against a batch that ends later, out of order and partly failed,
with no real-time call made. Each row answers what ``/v1/messages`` would for its params,
and batches are kept apart from :attr:`StubServer.requests` so a test can tell the two paths
apart.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum, StrEnum
from types import TracebackType
from typing import Any, Self

from aiohttp import web

from llm_router_testing.batches_stub import MAX_BYTES as MAX_BATCH_BYTES
from llm_router_testing.batches_stub import (
    BatchCall,
    MessageBatches,
    Plan,
    RecordedBatch,
    rid,
    stamp,
)

DIRECTIVE = re.compile(r"stub:(?P<key>[A-Za-z0-9_.\-*]+)=(?P<behaviour>[a-z_0-9]+)")
#: ``stub-fail:haiku=529x2`` fails the first 2 calls of this request to models whose name
#: contains ``haiku`` with HTTP 529, then lets it be answered; ``@1.5`` adds
#: ``retry-after: 1.5`` (a 429 gets ``retry-after: 1`` unless it says ``@none``).
FAILURE = re.compile(
    r"stub-fail:(?P<key>[A-Za-z0-9_.\-*]+)=(?P<status>\d{3})x(?P<times>\d+)(?:@(?P<after>[\d.]+|none))?"
)
REFUSAL_TEXT = "I'm sorry, but I cannot help with that."
#: What Anthropic's API may have sent before it stopped for a refusal (its docs' example).
PARTIAL_REFUSAL_TEXT = "Hello.."
#: ``stop_details`` of the stub's refusals (anthropic-sdk-python: ``RefusalStopDetails``).
REFUSAL_DETAILS = {
    "type": "refusal",
    "category": "cyber",
    "explanation": "The request could enable cyber harm (stub).",
}
#: Ollama's error for a prompt over the context with ``truncate: false`` (llm/llama_server.go).
OLLAMA_TOO_LONG = "the input length exceeds the context length"
#: Ollama's runner options (api/types.go): a request whose values differ from the loaded
#: runner's makes the scheduler load the model again. Taken from Ollama's source, not from
#: the worker's warm-up, so that a mistake in the worker's list shows here.
RUNNER_OPTIONS = (
    "num_ctx",
    "num_batch",
    "num_gpu",
    "main_gpu",
    "use_mmap",
    "num_thread",
    "draft_num_predict",
)
# Phrases a refusal detector may look for; the ``text`` answer must never trip one by accident.
REFUSAL_MARKERS = (
    "i cannot",
    "i can't",
    "i can\u2019t",
    "as an ai",
    "i don't know",
    "i don\u2019t know",
    "unable",
    "not able",
    "nie wiem",
)
_REFUSAL_RE = re.compile("|".join(map(re.escape, REFUSAL_MARKERS)), re.IGNORECASE)
_WIRES = {
    "/api/chat": "chat",
    "/api/generate": "generate",
    "/v1/messages": "anthropic",
    "/v1/chat/completions": "openai",
}
# llama.cpp's server (tools/server): its error types, and its words while it loads.
_OPENAI_ERRORS = {
    400: "invalid_request_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "unavailable_error",
}
LLAMA_CPP_LOADING = "Loading model"
# Ollama's own words (server/sched.go), two spaces included: clients may match on them.
OLLAMA_BUSY = "server busy, please try again.  maximum pending requests exceeded"
_OLLAMA_ERRORS = {
    500: "llama runner process has terminated: exit status 2 (stub)",
    429: "too many requests, retry later (stub)",
    503: OLLAMA_BUSY,
}
# Anthropic's error types by status (its API's "Errors" page).
_ANTHROPIC_ERRORS = {
    400: ("invalid_request_error", "There was an issue with the request (stub)"),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use this resource"),
    404: ("not_found_error", "model: not found (stub)"),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes"),
    429: ("rate_limit_error", "Rate limit exceeded for this model (stub)"),
    500: ("api_error", "Internal server error (stub)"),
    529: ("overloaded_error", "Overloaded"),
}


#: Anthropic's smallest cacheable prefix per model (its prompt-caching docs); shorter
#: prefixes are processed at full price without an error, as there.
_CACHE_MINIMUM = {"haiku-4-5": 4096, "sonnet-4-6": 2048, "opus-4-5": 4096, "opus-4-6": 4096}
_CACHE_TTL_S = 300.0


def _cache_minimum(model: str) -> int:
    return next((n for key, n in _CACHE_MINIMUM.items() if key in model), 1024)


def _cached_prefix(body: dict[str, Any]) -> str | None:
    """The text Anthropic would cache: tools, then system blocks up to the last one
    marked ``cache_control`` (breakpoints in messages are not modelled)."""
    system = body.get("system")
    if not isinstance(system, list):
        return None
    marked = [i for i, b in enumerate(system) if isinstance(b, dict) and b.get("cache_control")]
    if not marked:
        return None
    parts = [json.dumps(body.get("tools") or [])]
    parts += [str(b.get("text", "")) for b in system[: marked[-1] + 1] if isinstance(b, dict)]
    return "\0".join(parts)


class Behaviour(StrEnum):
    """How the stub answers a generation request."""

    TEXT = "text"
    JSON = "json"
    FENCED = "fenced"
    INVALID_JSON = "invalid_json"
    SCHEMA_VIOLATION = "schema_violation"
    REFUSAL = "refusal"
    HTTP_500 = "http_500"
    HTTP_429 = "http_429"
    HANG = "hang"
    SLOW = "slow"
    #: Answer with the last user message minus its first line (the directive's line).
    ECHO = "echo"
    #: An array nested 100,000 levels deep, and a 2,000,000-character JSON string.
    DEEP_JSON = "deep_json"
    HUGE_JSON = "huge_json"
    #: The text answer cut off as at num_predict / max_tokens: its echoed part halved.
    LENGTH = "length"
    #: Anthropic's refusal: HTTP 200, ``stop_reason: "refusal"``, the text so far and
    #: ``stop_details`` (its type, category and explanation).
    PROVIDER_REFUSAL = "provider_refusal"


_BEHAVIOURS = frozenset(b.value for b in Behaviour)


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the stub saw it, so tests can assert what the client really sent.

    Header names are lower-cased; ``behaviour`` and ``key`` are None for requests that do not
    generate (``/api/show``, ``/api/tags``...) or that were rejected before generating.
    """

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    model: str | None
    behaviour: Behaviour | None
    key: str | None


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _message_texts(body: dict[str, Any]) -> list[str]:
    return [s for part in ("system", "messages", "prompt") for s in _strings(body.get(part))]


def _last_user_text(body: dict[str, Any]) -> str:
    messages = body.get("messages")
    for message in reversed(messages if isinstance(messages, list) else []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # Anthropic content blocks
                return "".join(b.get("text", "") for b in content if isinstance(b, dict))
            return str(content or "")
    return str(body.get("prompt") or "")


def _scrub(text: str) -> str:
    while (cleaned := _REFUSAL_RE.sub("", text)) != text:
        text = cleaned
    return text


def answer_text(behaviour: Behaviour, key: str, user_text: str) -> str:
    """The text a non-failing behaviour answers; public so tests can state expectations."""
    payload = json.dumps({"answer": key, "ok": True})
    match behaviour:
        case Behaviour.JSON:
            return payload
        case Behaviour.FENCED:
            return f"Here you go:\n```json\n{payload}\n```\n"
        case Behaviour.INVALID_JSON:
            return payload.removesuffix("e}")
        case Behaviour.SCHEMA_VIOLATION:
            return '{"answer": 42}'
        case Behaviour.REFUSAL:
            return REFUSAL_TEXT
        case Behaviour.ECHO:
            return user_text.partition("\n")[2]
        case Behaviour.DEEP_JSON:
            return "[" * 100_000 + "]" * 100_000
        case Behaviour.HUGE_JSON:
            return json.dumps("x" * 2_000_000)
        case Behaviour.LENGTH:
            echoed = user_text[:60]
            return _scrub(f"Stub {key} answers: {echoed[: len(echoed) // 2]}")
        case Behaviour.PROVIDER_REFUSAL:
            return PARTIAL_REFUSAL_TEXT
        case _:
            return _scrub(f"Stub {key} answers: {user_text[:60]}")


def _tokens(texts: Sequence[str]) -> int:
    return max(1, sum(len(t) for t in texts) // 4)


def _pieces(text: str) -> list[str]:
    return re.findall(r"\s*\S+\s*", text) or [text]


def _now() -> str:
    return stamp(time.time())


def _anthropic_error(status: int, kind: str, message: str, **headers: str) -> web.Response:
    request_id = rid("req_01")
    body = {"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id}
    return web.json_response(body, status=status, headers={"request-id": request_id, **headers})


def _openai_error(status: int, message: str, kind: str | None = None, **extra: Any) -> web.Response:
    """An error as llama.cpp's server words it: OpenAI's shape, with ``code`` the status."""
    kind = kind or _OPENAI_ERRORS.get(status, "server_error")
    body = {"error": {"code": status, "message": message, "type": kind, **extra}}
    return web.json_response(body, status=status)


def _anthropic_header_rejection(request: web.Request) -> web.Response | None:
    """What the real API refuses in any call's headers: no key, no version. The key comes as
    ``x-api-key`` (litellm) or ``Authorization: Bearer`` (anthropic-sdk-python 2.x)."""
    scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
    if not request.headers.get("x-api-key", "").strip() and not (
        scheme == "Bearer" and bearer.strip()
    ):
        return _anthropic_error(401, "authentication_error", "invalid x-api-key")
    if not request.headers.get("anthropic-version"):
        return _anthropic_error(
            400, "invalid_request_error", "anthropic-version: header is required"
        )
    return None


def _anthropic_params_error(body: dict[str, Any]) -> tuple[int, str, str] | None:
    """What the real API refuses in a message's params before generating: (status, type,
    message). Shared by ``/v1/messages`` and the batch rows, which fail alike."""
    if "max_tokens" not in body:
        return 400, "invalid_request_error", "max_tokens: Field required"
    return None


def _anthropic_rejection(request: web.Request, body: dict[str, Any]) -> web.Response | None:
    """Reject what the real API rejects before generating, so auth and validation errors show."""
    if (rejection := _anthropic_header_rejection(request)) is not None:
        return rejection
    if (error := _anthropic_params_error(body)) is not None:
        return _anthropic_error(*error)
    return None


def _anthropic_content(body: dict[str, Any], text: str) -> tuple[dict[str, Any], str]:
    """A forced tool (litellm's JSON mode without native output) gets the JSON as tool input."""
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "tool":
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            tool = {"type": "tool_use", "id": rid("toolu_01"), "name": choice.get("name")}
            return {**tool, "input": parsed}, "tool_use"
    return {"type": "text", "text": text}, "end_turn"


def _output_limit(wire: str, body: dict[str, Any]) -> int | None:
    """Ollama's ``options.num_predict`` or Anthropic's ``max_tokens``, when positive."""
    if wire == "anthropic":
        value = body.get("max_tokens")
    elif wire == "openai":
        value = body.get("max_completion_tokens") or body.get("max_tokens")
    else:
        options = body.get("options")
        value = options.get("num_predict") if isinstance(options, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _tagged(name: str) -> str:
    """Ollama's name for a model given without a tag: ``qwen2.5`` is ``qwen2.5:latest``."""
    return name if ":" in name else f"{name}:latest"


class _Keep(Enum):
    """Marks a ``set_ollama`` argument as not given (None means unlimited there)."""

    KEEP = 0


_KEEP = _Keep.KEEP


class _ServerBusy(Exception):
    """Ollama's pending queue is full: the request gets a 503."""


@dataclass(eq=False)
class _Runner:
    """A model's runner as Ollama's scheduler keeps it: busy slots, FIFO waiters, loaded or not."""

    busy: int = 0
    loaded: bool = False
    #: The runner options it was loaded with, and the context that gives it.
    options: dict[str, Any] = field(default_factory=dict)
    num_ctx: int = 0
    expires_at: str = ""
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque)
    loading: asyncio.Lock = field(default_factory=asyncio.Lock)


def _check_ollama(parallel: int | None, max_queue: int, delay: float, cold_load: float) -> None:
    if parallel is not None and parallel < 1:
        raise ValueError(f"ollama_parallel must be None (unlimited) or >= 1, not {parallel}")
    if max_queue < 0 or delay < 0 or cold_load < 0:
        raise ValueError("ollama_max_queue, ollama_delay and cold_load must not be negative")


def _ollama_show(name: str, context_length: int) -> dict[str, Any]:
    base, _, tag = name.partition(":")
    family = base.split(".")[0] or "llama"
    size = tag.upper() if re.fullmatch(r"\d+(\.\d+)?[bm]", tag) else "7B"
    digest = hashlib.sha256(name.encode()).hexdigest()
    template = (
        "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        "{{- if .Tools }}<|im_start|>system\n# Tools\n{{ range .Tools }}{{ . }}\n{{ end }}"
        "<|im_end|>\n{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}"
        "<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    )
    parameters = (
        'stop                           "<|im_start|>"\nstop                           "<|im_end|>"'
    )
    return {
        "modelfile": f'# Modelfile generated by "ollama show"\n# FROM {name}\n\n'
        f'FROM /usr/share/ollama/.ollama/models/blobs/sha256-{digest}\nTEMPLATE """{template}"""\n'
        "PARAMETER stop <|im_start|>\nPARAMETER stop <|im_end|>\n",
        "parameters": parameters,
        "template": template,
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": family,
            "families": [family],
            "parameter_size": size,
            "quantization_level": "Q4_K_M",
        },
        "model_info": {
            "general.architecture": family,
            "general.file_type": 15,
            f"{family}.context_length": context_length,
            f"{family}.embedding_length": 3584,
        },
        "capabilities": ["completion", "tools"],
        "modified_at": _now(),
    }


class StubServer:
    """Ollama, Anthropic and OpenAI-compatible routes on one port, served from a background
    thread's event loop. The OpenAI-compatible ones are llama.cpp's server's
    (``/v1/chat/completions``, ``/v1/models``, ``/health``, ``/props``): the same runners and
    slots, ``num_ctx`` its context (a longer prompt is a 400, never truncated), and
    ``loading_s`` / ``load_again()`` its model load (503 "Loading model").

    One server can be the ``api_base`` of every model in a fallback chain, and its own loop lets
    sync tests, async tests (on another loop) and other processes use it alike.

    On the Ollama routes each model has a runner like Ollama's: ``ollama_parallel`` generations at
    a time (None: unlimited; Ollama's default is 1), the rest waiting FIFO in one queue of at most
    ``ollama_max_queue`` requests over all models (beyond it: Ollama's 503). Each generation holds
    its slot for ``ollama_delay`` seconds; a model's first request, the first after
    ``unload()`` and one whose runner options (``num_ctx``...) differ from the loaded runner's
    also spend ``cold_load`` seconds (re)loading it. The runner's context is the request's
    ``num_ctx``, else ``num_ctx`` (Ollama's smallest default), at most the model's
    ``context_length``; a longer prompt loses its oldest messages but the system ones and the
    last, as Ollama's ``truncate`` does (``truncate: false``: HTTP 400), and ``/api/ps`` lists
    loaded runners with their context. ``options.num_predict`` (Anthropic: ``max_tokens``)
    cuts an answer and says so. ``strict_models`` answers Ollama's 404 for models not in
    ``models``. The defaults keep the stub instant and permissive.

    Message Batches (:mod:`~llm_router_testing.batches_stub`): a batch's requests finish over
    ``batch_seconds``; batches created while ``expire_batches`` is set end after that time
    with every request ``expired``; ``batch_max_bytes`` is the create body's limit (413).
    ``batches``, ``batch_requests`` and ``batch_calls`` record them, apart from ``requests``.
    """

    def __init__(
        self,
        port: int = 0,
        *,
        slow_delay: float = 1.0,
        models: Sequence[str] = ("qwen2.5:7b", "llama3.1:8b"),
        context_length: int = 32768,
        num_ctx: int = 4096,
        ollama_parallel: int | None = None,
        ollama_max_queue: int = 512,
        ollama_delay: float = 0.0,
        cold_load: float = 0.0,
        strict_models: bool = False,
        loading_s: float = 0.0,
        batch_seconds: float = 0.5,
    ) -> None:
        _check_ollama(ollama_parallel, ollama_max_queue, ollama_delay, cold_load)
        self.slow_delay = slow_delay
        self.models = list(models)
        self.context_length = context_length
        self.num_ctx = num_ctx
        self.ollama_parallel = ollama_parallel
        self.ollama_max_queue = ollama_max_queue
        self.ollama_delay = ollama_delay
        self.cold_load = cold_load
        self.strict_models = strict_models
        #: The OpenAI-compatible routes' model load at start (llama.cpp's server loads
        #: its one model then): ``/health`` and generations answer 503 until it is done.
        self.loading_s = loading_s
        #: Message Batches: how long a batch processes; whether new batches expire instead
        #: (every request ``expired`` after ``batch_seconds``); the create body's limit.
        self.batch_seconds = batch_seconds
        self.expire_batches = False
        self.batch_max_bytes = MAX_BATCH_BYTES
        self._batches = MessageBatches(self)
        self._ready_at = 0.0
        self._port = port
        self._url: str | None = None
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._defaults: dict[str, Behaviour] = {}
        self._failed: Counter[tuple[str, str]] = Counter()
        self._prompt_cache: dict[tuple[str, str], float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        # Runner state and counters; changed on the server's loop, read from any thread.
        self._runners: dict[str, _Runner] = {}
        self._waiting = 0
        self._in_flight = self._peak_in_flight = 0
        self._generating = self._peak_generating = 0
        self._served: dict[str, int] = {}
        self._dropped = self._rejected_busy = 0
        self._truncated = self._loads = 0

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("StubServer is not started")
        return self._url

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        """Forget the recorded requests (batches stay: see ``clear_batches``)."""
        with self._lock:
            self._requests.clear()

    @property
    def batches(self) -> list[RecordedBatch]:
        """Every Message Batch created, oldest first, as it stands now (deleted ones too)."""
        return self._batches.snapshot()

    @property
    def batch_requests(self) -> dict[str, int]:
        """Per model: requests submitted in Message Batches (never in ``requests``)."""
        return self._batches.per_model

    @property
    def batch_calls(self) -> list[BatchCall]:
        """Every HTTP call to the batch routes, in order (never in ``requests``)."""
        return self._batches.calls

    def clear_batches(self) -> None:
        """Forget every batch (the routes answer 404 for them) and the batch records."""
        self._batches.clear()

    def set_behaviour(self, key: str, behaviour: Behaviour | str) -> None:
        """Default behaviour for models whose name contains ``key``; directives still win."""
        with self._lock:
            self._defaults[key] = Behaviour(behaviour)

    def reset_behaviours(self) -> None:
        with self._lock:
            self._defaults.clear()

    @property
    def in_flight(self) -> int:
        """Ollama generation requests inside the server now, waiting for a slot or holding one."""
        with self._lock:
            return self._in_flight

    @property
    def peak_in_flight(self) -> int:
        """The most ``in_flight`` there has been since start or ``reset_peak()``."""
        with self._lock:
            return self._peak_in_flight

    @property
    def generating(self) -> int:
        """Ollama requests holding a runner slot now (loading or generating), over all models."""
        with self._lock:
            return self._generating

    @property
    def peak_generating(self) -> int:
        """The most ``generating`` there has been since start or ``reset_peak()``."""
        with self._lock:
            return self._peak_generating

    @property
    def served(self) -> dict[str, int]:
        """Per model (as the client named it): requests answered after getting a runner slot."""
        with self._lock:
            return dict(self._served)

    @property
    def dropped(self) -> int:
        """Queued requests whose client gave up before they got a slot; never served."""
        with self._lock:
            return self._dropped

    @property
    def rejected_busy(self) -> int:
        """Requests answered 503 because the pending queue was full."""
        with self._lock:
            return self._rejected_busy

    @property
    def truncated(self) -> int:
        """Prompts whose oldest messages were dropped to fit the runner's context."""
        with self._lock:
            return self._truncated

    @property
    def loads(self) -> int:
        """Model loads (cold or for other runner options) since start."""
        with self._lock:
            return self._loads

    def reset_peak(self) -> None:
        """Start both peaks again from what is in flight now."""
        with self._lock:
            self._peak_in_flight, self._peak_generating = self._in_flight, self._generating

    def reset_counters(self) -> None:
        """Zero ``served``, ``dropped`` and ``rejected_busy`` and reset the peaks."""
        with self._lock:
            self._served.clear()
            self._dropped = self._rejected_busy = 0
            self._peak_in_flight, self._peak_generating = self._in_flight, self._generating

    def load_again(self, seconds: float) -> None:
        """The OpenAI-compatible routes load their model again for ``seconds`` (as a
        restarted llama.cpp server does): 503 "Loading model" until then."""
        with self._lock:
            self._ready_at = time.monotonic() + seconds

    def unload(self, model: str | None = None) -> None:
        """Make the next request for ``model`` (None: every model) load it cold again."""
        with self._lock:
            for name, runner in self._runners.items():
                if model is None or name == model:
                    runner.loaded = False

    def set_ollama(
        self,
        *,
        parallel: int | _Keep | None = _KEEP,
        max_queue: int | _Keep = _KEEP,
        delay: float | _Keep = _KEEP,
        cold_load: float | _Keep = _KEEP,
    ) -> None:
        """Change the runner settings of a running server; arguments not given stay as they are.

        Waiters get the slots a raised ``parallel`` opens at once; a lowered one lets the running
        generations finish. Tests sharing one server set these and put them back.
        """
        with self._lock:
            new = (
                self.ollama_parallel if isinstance(parallel, _Keep) else parallel,
                self.ollama_max_queue if isinstance(max_queue, _Keep) else max_queue,
                self.ollama_delay if isinstance(delay, _Keep) else delay,
                self.cold_load if isinstance(cold_load, _Keep) else cold_load,
            )
            _check_ollama(*new)
            self.ollama_parallel, self.ollama_max_queue, self.ollama_delay, self.cold_load = new
        if (loop := self._loop) is not None:
            loop.call_soon_threadsafe(self._wake_all)

    def start(self) -> str:
        if self._url is not None:
            return self._url
        loop = asyncio.new_event_loop()
        self._loop, self._stopping = loop, asyncio.Event()
        self._thread = threading.Thread(
            target=self._run, args=(loop,), name="stub-server", daemon=True
        )
        self._thread.start()
        try:
            port = asyncio.run_coroutine_threadsafe(self._open(), loop).result(timeout=10)
        except BaseException:
            self.stop()  # e.g. the port is taken: do not leak the thread
            raise
        self._url = f"http://127.0.0.1:{port}"
        self._ready_at = time.monotonic() + self.loading_s
        return self._url

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._close(), loop).result(timeout=10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            self._loop = self._thread = self._url = None

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

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _open(self) -> int:
        app = web.Application()
        app.router.add_get("/", self._hello)
        app.router.add_get("/api/version", self._hello)
        app.router.add_get("/api/tags", self._tags)
        app.router.add_get("/api/ps", self._ps)
        app.router.add_post("/api/show", self._show)
        app.router.add_get("/health", self._health)
        app.router.add_get("/props", self._props)
        app.router.add_get("/v1/models", self._models)
        for path in _WIRES:
            app.router.add_post(path, self._generate)
        self._batches.mount(app.router)
        # handler_cancellation: a client giving up cancels its handler, as on a real server.
        self._runner = web.AppRunner(
            app, shutdown_timeout=1.0, handler_cancellation=True, access_log=None
        )
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self._port).start()
        return int(self._runner.addresses[0][1])

    async def _close(self) -> None:
        self._stopping.set()  # releases hanging handlers so shutdown does not wait on them
        if self._runner is not None:
            await self._runner.cleanup()

    @staticmethod
    async def _hello(request: web.Request) -> web.Response:
        if request.path == "/api/version":
            return web.json_response({"version": "0.12.6"})
        return web.Response(text="Ollama is running")

    def _record(
        self,
        request: web.Request,
        body: Any,
        model: str | None = None,
        choice: tuple[Behaviour, str] | tuple[None, None] = (None, None),
    ) -> None:
        headers = {k.lower(): v for k, v in request.headers.items()}
        entry = RecordedRequest(request.method, request.path, headers, body, model, *choice)
        with self._lock:
            self._requests.append(entry)

    def _choose(self, model: str, texts: Sequence[str]) -> tuple[Behaviour, str]:
        def applies(key: str) -> bool:
            return key == "*" or key.lower() in model.lower()

        for text in texts:
            for match in DIRECTIVE.finditer(text):
                key, name = match["key"], match["behaviour"]
                if applies(key) and name in _BEHAVIOURS:
                    return Behaviour(name), key
        with self._lock:
            defaults = list(self._defaults.items())
        for key, behaviour in defaults:
            if applies(key):
                return behaviour, key
        return Behaviour.TEXT, model

    async def _tags(self, request: web.Request) -> web.Response:
        self._record(request, None)
        models = [
            {
                "name": m,
                "model": m,
                "modified_at": _now(),
                "size": 4_683_087_332,
                "digest": hashlib.sha256(m.encode()).hexdigest(),
                "details": _ollama_show(m, self.context_length)["details"],
            }
            for m in self.models
        ]
        return web.json_response({"models": models})

    async def _ps(self, request: web.Request) -> web.Response:
        """Loaded models as ``GET /api/ps`` lists them (api/types.go: ProcessModelResponse)."""
        self._record(request, None)
        with self._lock:
            runners = self._runners.items()
            loaded = [(name, r.num_ctx, r.expires_at) for name, r in runners if r.loaded]
        models = [
            {
                "name": _tagged(name),
                "model": _tagged(name),
                "size": 5_964_210_176,
                "digest": hashlib.sha256(_tagged(name).encode()).hexdigest(),
                "details": _ollama_show(name, self.context_length)["details"],
                "expires_at": expires,
                "size_vram": 5_964_210_176,
                "context_length": num_ctx,
            }
            for name, num_ctx, expires in loaded
        ]
        return web.json_response({"models": models})

    async def _show(self, request: web.Request) -> web.Response:
        body = await request.json()
        name = str(body.get("model") or body.get("name") or "")
        self._record(request, body, name)
        return web.json_response(_ollama_show(name, self.context_length))

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        started, wire = time.monotonic_ns(), _WIRES[request.path]
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self._record(request, body)
            message = "request body must be a JSON object"
            if wire == "anthropic":
                return _anthropic_error(400, "invalid_request_error", message)
            return web.json_response({"error": message}, status=400)
        model = str(body.get("model") or "")
        if wire == "openai":
            return await self._openai_generate(request, body, model)
        if wire != "anthropic":
            return await self._ollama_generate(request, body, wire, model, started)
        if (rejection := _anthropic_rejection(request, body)) is not None:
            self._record(request, body, model)
            return rejection
        texts = _message_texts(body)
        if (failure := self._planned_failure(model, texts)) is not None:
            self._record(request, body, model)
            return failure
        choice = self._choose(model, texts)
        self._record(request, body, model, choice)
        return await self._answer(request, body, wire, choice)

    def _planned_status(self, model: str, texts: list[str]) -> tuple[int, str | None] | None:
        """A ``stub-fail:`` directive's status and ``@`` delay, for the first calls of this
        request only (each call counts, batch rows included)."""
        for text in texts:
            for match in FAILURE.finditer(text):
                key = match["key"]
                if key != "*" and key.lower() not in model.lower():
                    continue
                status, times = int(match["status"]), int(match["times"])
                seen = (model, "\0".join(texts))
                with self._lock:
                    self._failed[seen] += 1
                    if self._failed[seen] > times:
                        return None
                return status, match["after"]
        return None

    def _planned_failure(
        self, model: str, texts: list[str], wire: str = "anthropic"
    ) -> web.Response | None:
        """A ``stub-fail:`` directive's error, for the first calls of this request only, in
        the wire's own words (Ollama: 503 is its full queue, 404 an unknown model)."""
        if (planned := self._planned_status(model, texts)) is None:
            return None
        status, after = planned
        if wire == "openai":
            return _openai_error(status, f"stub-fail {status}")
        if wire != "anthropic":
            message = _OLLAMA_ERRORS.get(status, _OLLAMA_ERRORS[500])
            if status == 404:
                message = f"model '{model}' not found"
            return web.json_response({"error": message}, status=status)
        after = after or ("1" if status == 429 else "none")
        headers = {} if after == "none" else {"retry-after": after}
        kind, message = _ANTHROPIC_ERRORS.get(status, _ANTHROPIC_ERRORS[500])
        return _anthropic_error(status, kind, message, **headers)

    # -- Message Batches: what the batch routes ask of the server -------------------------

    def batch_rejection(self, request: web.Request) -> web.Response | None:
        return _anthropic_header_rejection(request)

    @staticmethod
    def batch_error(status: int, kind: str, message: str) -> web.Response:
        return _anthropic_error(status, kind, message)

    def batch_plan(self, params: dict[str, Any]) -> Plan:
        """How a row will be answered, chosen when its batch is created: a hanging one never
        finishes, a slow one takes ``slow_delay`` longer."""
        model = str(params.get("model") or "")
        behaviour, key = self._choose(model, _message_texts(params))
        extra = {Behaviour.HANG: None, Behaviour.SLOW: self.slow_delay}.get(behaviour, 0.0)
        return Plan(model, behaviour, key, extra)

    def batch_result(self, params: dict[str, Any], plan: Plan) -> dict[str, Any]:
        """A processed row: what ``/v1/messages`` would answer for these params without
        streaming, its refusals as ``errored`` rows; billed at the batch tier."""
        behaviour = Behaviour(plan.behaviour or Behaviour.TEXT)
        error = _anthropic_params_error(params)
        if error is None and (planned := self._planned_status(plan.model, _message_texts(params))):
            kind, message = _ANTHROPIC_ERRORS.get(planned[0], _ANTHROPIC_ERRORS[500])
            error = planned[0], kind, message
        if error is None and behaviour in (Behaviour.HTTP_500, Behaviour.HTTP_429):
            status = 500 if behaviour is Behaviour.HTTP_500 else 429
            error = status, *_ANTHROPIC_ERRORS[status]
        if error is not None:
            _, kind, message = error
            body = {"type": "error", "error": {"type": kind, "message": message}}
            return {"type": "errored", "error": {**body, "request_id": None}}
        text, usage, cut = self._compose(params, "anthropic", behaviour, plan.key or plan.model)
        refused = behaviour is Behaviour.PROVIDER_REFUSAL
        message_ = self._anthropic_message(params, text, usage, cut, refused)
        message_["usage"]["service_tier"] = "batch"
        return {"type": "succeeded", "message": message_}

    async def _ollama_generate(
        self, request: web.Request, body: dict[str, Any], wire: str, model: str, started: int
    ) -> web.StreamResponse:
        """What Ollama's scheduler does before a model answers: 404, queue or 503, cold load."""
        if self.strict_models and _tagged(model) not in {_tagged(m) for m in self.models}:
            self._record(request, body, model)
            return web.json_response({"error": f"model '{model}' not found"}, status=404)
        # No messages (no prompt) asks Ollama only to load the model.
        load_only = not body.get("messages" if wire == "chat" else "prompt")
        texts = _message_texts(body)
        if not load_only and (failure := self._planned_failure(model, texts, wire)) is not None:
            self._record(request, body, model)
            return failure
        choice = None if load_only else self._choose(model, texts)
        try:
            runner, waiter = self._admit(model)
        except _ServerBusy:
            self._record(request, body, model)
            return web.json_response({"error": OLLAMA_BUSY}, status=503)
        self._record(request, body, model, choice or (None, None))
        if waiter is not None:
            await self._wait_turn(runner, waiter)
        try:
            await self._load(runner, body)
            loaded = time.monotonic_ns()  # Ollama's load_duration counts the wait for a runner
            if choice is not None and wire == "chat":
                fitted = self._fit_context(body, runner.num_ctx)
                if fitted is None:
                    return web.json_response({"error": OLLAMA_TOO_LONG}, status=400)
                body = fitted
            if choice is None:
                empty: dict[str, Any] = (
                    {"message": {"role": "assistant", "content": ""}}
                    if wire == "chat"
                    else {"response": ""}
                )
                stamp = {"model": body.get("model"), "created_at": _now()}
                response: web.StreamResponse = web.json_response(
                    {**stamp, **empty, "done_reason": "load", "done": True}
                )
            else:
                with self._lock:
                    delay = self.ollama_delay
                timing = (started, loaded - started, delay)
                response = await self._answer(
                    request, body, wire, choice, timing, runner.num_ctx or None
                )
            if choice is None or choice[0] is not Behaviour.HANG:
                with self._lock:
                    self._served[model] = self._served.get(model, 0) + 1
            return response
        finally:
            self._release(runner)

    # -- an OpenAI-compatible local server, as llama.cpp's (tools/server) ----------------

    async def _health(self, request: web.Request) -> web.Response:
        self._record(request, None)
        if time.monotonic() < self._ready_at:
            return _openai_error(503, LLAMA_CPP_LOADING)
        return web.json_response({"status": "ok"})

    async def _props(self, request: web.Request) -> web.Response:
        self._record(request, None)
        with self._lock:
            slots = self.ollama_parallel or 1
        n_ctx = min(self.num_ctx, self.context_length)
        settings = {"n_ctx": n_ctx, "temperature": 0.8, "n_predict": -1}
        return web.json_response(
            {"default_generation_settings": settings, "total_slots": slots, "model_path": "stub"}
        )

    async def _models(self, request: web.Request) -> web.Response:
        self._record(request, None)
        data = [
            {
                "id": m,
                "object": "model",
                "created": int(time.time()),
                "owned_by": "llamacpp",
                "meta": {"n_ctx_train": self.context_length},
            }
            for m in self.models
        ]
        return web.json_response({"object": "list", "data": data})

    async def _openai_generate(
        self, request: web.Request, body: dict[str, Any], model: str
    ) -> web.StreamResponse:
        """What llama.cpp's server does before it answers: 503 while its model loads, a
        slot (``ollama_parallel`` of them; the rest wait in turn), and 400 for a prompt
        over its context (it never truncates)."""
        if time.monotonic() < self._ready_at:
            self._record(request, body, model)
            return _openai_error(503, LLAMA_CPP_LOADING)
        texts = _message_texts(body)
        if (failure := self._planned_failure(model, texts, "openai")) is not None:
            self._record(request, body, model)
            return failure
        choice = self._choose(model, texts)
        try:
            runner, waiter = self._admit(model)
        except _ServerBusy:
            self._record(request, body, model)
            return _openai_error(503, "the server is busy (stub)")
        self._record(request, body, model, choice)
        if waiter is not None:
            await self._wait_turn(runner, waiter)
        try:
            await self._load(runner, {})
            prompt = _tokens(texts)
            if prompt > runner.num_ctx:
                message = (
                    f"request ({prompt} tokens) exceeds the available context size "
                    f"({runner.num_ctx} tokens), try increasing it"
                )
                return _openai_error(
                    400,
                    message,
                    "exceed_context_size_error",
                    n_prompt_tokens=prompt,
                    n_ctx=runner.num_ctx,
                )
            with self._lock:
                delay = self.ollama_delay
            response = await self._answer(request, body, "openai", choice, (0, 0, delay))
            if choice[0] is not Behaviour.HANG:
                with self._lock:
                    self._served[model] = self._served.get(model, 0) + 1
            return response
        finally:
            self._release(runner)

    async def _openai(
        self,
        request: web.Request,
        body: dict[str, Any],
        text: str,
        usage: tuple[int, int],
        delay: float,
        cut: bool,
    ) -> web.StreamResponse:
        """A chat completion in OpenAI's shape, after ``delay`` seconds of generation."""
        if delay > 0:
            await asyncio.sleep(delay)
        stamp = {
            "id": rid("chatcmpl-"),
            "created": int(time.time()),
            "model": body.get("model"),
            "system_fingerprint": "b4500-stub",
        }
        finish = "length" if cut else "stop"
        counts = {
            "prompt_tokens": usage[0],
            "completion_tokens": usage[1],
            "total_tokens": usage[0] + usage[1],
        }
        if body.get("stream") is not True:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
            }
            return web.json_response(
                {**stamp, "object": "chat.completion", "choices": [choice], "usage": counts}
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunks = [{"role": "assistant", "content": piece} for piece in _pieces(text)]
        for delta, reason in [*((c, None) for c in chunks), ({}, finish)]:
            chunk = {
                **stamp,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason}],
            }
            if reason is not None:
                chunk["usage"] = counts
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _answer(
        self,
        request: web.Request,
        body: dict[str, Any],
        wire: str,
        choice: tuple[Behaviour, str],
        timing: tuple[int, int, float] = (0, 0, 0.0),
        context: int | None = None,
    ) -> web.StreamResponse:
        """Answer as ``choice`` says; ``timing``: Ollama's start, load time, generation delay;
        ``context``: the runner's window, which caps the prompt tokens read."""
        behaviour, key = choice
        if behaviour in (Behaviour.HTTP_500, Behaviour.HTTP_429):
            status = 500 if behaviour is Behaviour.HTTP_500 else 429
            if wire == "openai":
                return _openai_error(status, _OLLAMA_ERRORS[status])
            if wire != "anthropic":
                return web.json_response({"error": _OLLAMA_ERRORS[status]}, status=status)
            kind, message = _ANTHROPIC_ERRORS[status]
            extra = {"retry-after": "1"} if status == 429 else {}
            return _anthropic_error(status, kind, message, **extra)
        if behaviour is Behaviour.HANG:
            await self._stopping.wait()  # or aiohttp cancels us when the client disconnects
            if request.transport is not None:
                request.transport.abort()  # a stopping server drops the call, it does not answer
            return web.Response()
        if behaviour is Behaviour.SLOW:
            await asyncio.sleep(self.slow_delay)
        text, usage, cut = self._compose(body, wire, behaviour, key, context)
        if wire == "anthropic":
            refused = behaviour is Behaviour.PROVIDER_REFUSAL
            return await self._anthropic(request, body, text, usage, cut, refused)
        if wire == "openai":
            return await self._openai(request, body, text, usage, timing[2], cut)
        return await self._ollama(request, body, text, wire, usage, timing, cut)

    @staticmethod
    def _compose(
        body: dict[str, Any],
        wire: str,
        behaviour: Behaviour,
        key: str,
        context: int | None = None,
    ) -> tuple[str, tuple[int, int], bool]:
        """A non-failing behaviour's answer: its text, (prompt, answer) tokens, and whether
        it was cut at its output limit."""
        text = answer_text(behaviour, key, _last_user_text(body))
        cut = behaviour is Behaviour.LENGTH
        limit = _output_limit(wire, body)
        if limit is not None and _tokens([text]) > limit:  # the answer stops at its limit
            text, cut = text[: limit * 4], True
        prompt = _tokens(_message_texts(body))
        if context is not None:  # what did not fit was never read
            prompt = min(prompt, context)
        return text, (prompt, _tokens([text])), cut

    def _admit(self, model: str) -> tuple[_Runner, asyncio.Future[None] | None]:
        """Count a request in: a free slot now (no waiter), a place in the queue, or 503."""
        with self._lock:
            runner = self._runners.setdefault(model, _Runner())
            if not runner.waiters and self._has_room(runner):
                runner.busy += 1
                self._generating += 1
                waiter = None
            elif self._waiting >= self.ollama_max_queue:
                self._rejected_busy += 1
                raise _ServerBusy
            else:
                waiter = asyncio.get_running_loop().create_future()
                runner.waiters.append(waiter)
                self._waiting += 1
            self._in_flight += 1
            self._note_peaks()
        return runner, waiter

    async def _wait_turn(self, runner: _Runner, waiter: asyncio.Future[None]) -> None:
        """Wait for a slot; a client that gives up meanwhile is dropped, as Ollama drops it."""
        try:
            await waiter
        except asyncio.CancelledError:
            granted = waiter.done() and not waiter.cancelled()
            if granted:  # the slot came just as the client left: pass it on
                self._release(runner)
            else:
                with self._lock:
                    if waiter in runner.waiters:
                        runner.waiters.remove(waiter)
                        self._waiting -= 1
                    self._in_flight -= 1
                    self._dropped += 1
            raise

    async def _load(self, runner: _Runner, body: dict[str, Any]) -> None:
        """Load a cold model once, or again for other runner options; requests that got
        slots meanwhile wait for that same load."""
        options = body.get("options")
        given: dict[str, Any] = options if isinstance(options, dict) else {}
        wanted = {k: given[k] for k in RUNNER_OPTIONS if k in given}
        async with runner.loading:
            with self._lock:
                if runner.loaded and runner.options == wanted:
                    runner.expires_at = self._expiry(body)
                    return
                seconds = self.cold_load
            if seconds > 0:
                await asyncio.sleep(seconds)
            num_ctx = wanted.get("num_ctx")
            with self._lock:
                runner.loaded, runner.options = True, wanted
                base = num_ctx if isinstance(num_ctx, int) and num_ctx > 0 else self.num_ctx
                runner.num_ctx = min(base, self.context_length)
                runner.expires_at = self._expiry(body)
                self._loads += 1

    @staticmethod
    def _expiry(body: dict[str, Any]) -> str:
        keep = body.get("keep_alive")
        if isinstance(keep, int | float) and keep < 0:
            return "2318-08-22T01:06:59.123456789Z"  # what Ollama shows for "forever"
        seconds = keep if isinstance(keep, int | float) else 300
        return datetime.fromtimestamp(time.time() + seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def _fit_context(self, body: dict[str, Any], num_ctx: int) -> dict[str, Any] | None:
        """The body Ollama would render: the oldest non-system messages dropped until the
        prompt fits (always the last one kept), or None for ``truncate: false``."""
        messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]

        def size(kept: list[dict[str, Any]]) -> int:
            return _tokens([s for m in kept for s in _strings(m.get("content"))])

        if size(messages) <= num_ctx:
            return body
        if body.get("truncate") is False:
            return None
        for start in range(1, len(messages)):
            system = [m for m in messages[:start] if m.get("role") == "system"]
            kept = system + messages[start:]
            if size(kept) <= num_ctx or start == len(messages) - 1:
                break
        else:
            kept = messages
        with self._lock:
            self._truncated += 1
        return {**body, "messages": kept}

    def _release(self, runner: _Runner) -> None:
        with self._lock:
            runner.busy -= 1
            self._generating -= 1
            self._in_flight -= 1
            self._wake(runner)

    def _has_room(self, runner: _Runner) -> bool:
        return self.ollama_parallel is None or runner.busy < self.ollama_parallel

    def _wake(self, runner: _Runner) -> None:
        """Hand free slots to the oldest waiters; call on the loop with the lock held."""
        while runner.waiters and self._has_room(runner):
            waiter = runner.waiters.popleft()
            self._waiting -= 1
            if waiter.cancelled():  # its handler is being cancelled and counts itself dropped
                continue
            waiter.set_result(None)
            runner.busy += 1
            self._generating += 1
        self._note_peaks()

    def _wake_all(self) -> None:
        with self._lock:
            for runner in self._runners.values():
                self._wake(runner)

    def _note_peaks(self) -> None:
        self._peak_in_flight = max(self._peak_in_flight, self._in_flight)
        self._peak_generating = max(self._peak_generating, self._generating)

    async def _ollama(
        self,
        request: web.Request,
        body: dict[str, Any],
        text: str,
        wire: str,
        usage: tuple[int, int],
        timing: tuple[int, int, float],
        cut: bool,
    ) -> web.StreamResponse:
        """Answer in Ollama's format, taking ``delay`` seconds as a runner generating would."""
        started, load, delay = timing

        def chunk(content: str) -> dict[str, Any]:
            field: dict[str, Any] = (
                {"message": {"role": "assistant", "content": content}}
                if wire == "chat"
                else {"response": content}
            )
            return {
                "model": body.get("model"),
                "created_at": _now(),
                **field,
                "done": False,
            }

        def final(content: str) -> dict[str, Any]:
            load_ns = max(1, load)
            rest = max(2, time.monotonic_ns() - started - load_ns)
            stats = {
                "done": True,
                "done_reason": "length" if cut else "stop",
                "total_duration": load_ns + rest,
                "load_duration": load_ns,
                "prompt_eval_count": usage[0],
                "prompt_eval_duration": rest // 3,
                "eval_count": usage[1],
                "eval_duration": rest - rest // 3,
            }
            extra = {} if wire == "chat" else {"context": list(range(1, usage[0] + usage[1] + 1))}
            return {**chunk(content), **stats, **extra}

        if body.get("stream", True) is False:  # Ollama streams unless told not to
            if delay > 0:
                await asyncio.sleep(delay)
            return web.json_response(final(text))
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        pieces = _pieces(text)
        for piece in pieces:
            if delay > 0:
                await asyncio.sleep(delay / len(pieces))  # tokens come out over the delay
            await response.write(json.dumps(chunk(piece)).encode() + b"\n")
        await response.write(json.dumps(final("")).encode() + b"\n")
        await response.write_eof()
        return response

    def _cache_usage(self, body: dict[str, Any], input_tokens: int) -> dict[str, int]:
        """Split the input as Anthropic's prompt cache does: a marked prefix is written on
        its first call (at 1.25x) and read for five minutes after each use (at 0.1x)."""
        usage = {"input_tokens": input_tokens}
        prefix = _cached_prefix(body)
        model = str(body.get("model"))
        cached = _tokens([prefix]) if prefix is not None else 0
        if prefix is None or cached < _cache_minimum(model):
            return {**usage, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        entry = (model, hashlib.sha256(prefix.encode()).hexdigest())
        now = time.monotonic()
        with self._lock:
            hit = self._prompt_cache.get(entry, 0.0) > now
            self._prompt_cache[entry] = now + _CACHE_TTL_S
        rest = max(0, input_tokens - cached)
        read, created = (cached, 0) if hit else (0, cached)
        return {
            "input_tokens": rest,
            "cache_creation_input_tokens": created,
            "cache_read_input_tokens": read,
        }

    def _anthropic_message(
        self,
        body: dict[str, Any],
        text: str,
        usage: tuple[int, int],
        cut: bool,
        refused: bool = False,
    ) -> dict[str, Any]:
        """The whole ``Message`` (anthropic-sdk-python: types/message.py) for this answer."""
        block, stop_reason = _anthropic_content(body, text)
        if refused:
            block, stop_reason = {"type": "text", "text": text}, "refusal"
        elif cut:
            stop_reason = "max_tokens"
        stop: dict[str, Any] = {"stop_reason": stop_reason}
        if refused:
            stop["stop_details"] = REFUSAL_DETAILS
        return {
            "id": rid("msg_01"),
            "type": "message",
            "role": "assistant",
            "model": body.get("model"),
            "content": [block],
            **stop,
            "stop_sequence": None,
            "usage": {"output_tokens": usage[1], **self._cache_usage(body, usage[0])},
        }

    async def _anthropic(
        self,
        request: web.Request,
        body: dict[str, Any],
        text: str,
        usage: tuple[int, int],
        cut: bool,
        refused: bool = False,
    ) -> web.StreamResponse:
        message = self._anthropic_message(body, text, usage, cut, refused)
        [block] = message["content"]
        stop = {k: message[k] for k in ("stop_reason", "stop_details") if k in message}
        headers = {"request-id": rid("req_01")}
        if body.get("stream") is not True:
            return web.json_response(message, headers=headers)
        response = web.StreamResponse(
            headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)

        start = {**message, "content": [], "stop_reason": None}
        start["usage"] = {**message["usage"], "output_tokens": 1}
        if block["type"] == "tool_use":
            opening = {**block, "input": {}}
            deltas = [{"type": "input_json_delta", "partial_json": json.dumps(block["input"])}]
        else:
            opening = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": piece} for piece in _pieces(text)]
        events: list[tuple[str, dict[str, Any]]] = [
            ("message_start", {"message": start}),
            ("content_block_start", {"index": 0, "content_block": opening}),
            ("ping", {}),
            *[("content_block_delta", {"index": 0, "delta": delta}) for delta in deltas],
            ("content_block_stop", {"index": 0}),
            (
                "message_delta",
                {
                    "delta": {**stop, "stop_sequence": None},
                    "usage": {"output_tokens": usage[1]},
                },
            ),
            ("message_stop", {}),
        ]
        for name, data in events:
            payload = json.dumps({"type": name, **data})
            await response.write(f"event: {name}\ndata: {payload}\n\n".encode())
        await response.write_eof()
        return response


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the stubs as a separate process (for the demo) until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m llm_router_testing.stubs", description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0 = any free)")
    parser.add_argument(
        "--slow-delay", type=float, default=1.0, help="seconds before `slow` answers"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=BEHAVIOUR",
        help="default behaviour for models containing KEY (repeatable)",
    )
    parser.add_argument(
        "--ollama-parallel", type=int, default=None, help="generations at a time per model"
    )
    parser.add_argument("--ollama-max-queue", type=int, default=512, help="pending requests")
    parser.add_argument("--ollama-delay", type=float, default=0.0, help="seconds per generation")
    parser.add_argument("--cold-load", type=float, default=0.0, help="seconds a first load takes")
    parser.add_argument("--strict-models", action="store_true", help="404 for unknown models")
    parser.add_argument(
        "--batch-seconds", type=float, default=0.5, help="seconds a Message Batch processes"
    )
    args = parser.parse_args(argv)
    defaults: list[tuple[str, Behaviour]] = []
    for item in args.set:
        key, _, name = item.partition("=")
        if not key or name not in _BEHAVIOURS:
            parser.error(f"--set {item!r}: expected KEY=one of {', '.join(Behaviour)}")
        defaults.append((key, Behaviour(name)))
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    try:
        server = StubServer(
            args.port,
            slow_delay=args.slow_delay,
            ollama_parallel=args.ollama_parallel,
            ollama_max_queue=args.ollama_max_queue,
            ollama_delay=args.ollama_delay,
            cold_load=args.cold_load,
            strict_models=args.strict_models,
            batch_seconds=args.batch_seconds,
        )
    except ValueError as exc:
        parser.error(str(exc))
    with server as stub:
        for key, behaviour in defaults:
            stub.set_behaviour(key, behaviour)
        print(stub.url, flush=True)
        while not stopped.wait(0.5):
            pass


if __name__ == "__main__":
    main()
