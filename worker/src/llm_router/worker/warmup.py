"""A warm local model: loaded before the first job, and again when its breaker closes.

Ollama unloads a model that has been idle for 5 minutes unless a request's
``keep_alive`` says otherwise (every call of ours carries the model's
``keep_alive``, -1 = stay loaded), and it aborts a load when its client hangs up:
under an 8 s deadline a cold 7B model on a small server may never finish
loading. So the worker asks Ollama to load each local model with a load-only
request (``/api/chat`` with no messages) that has no short deadline, with the same
``options`` and ``keep_alive`` the calls send: Ollama loads a model again for a
request whose runner options (``num_ctx`` among them) differ from the loaded one's.
Once loaded, ``/api/ps`` says the context window the model really has.

An OpenAI-compatible local server (llama.cpp's, llama-cpp-python's, vLLM, LM Studio)
loads its one model when it starts and cannot be asked to load: the warm-up waits
until it is ready (llama.cpp's ``/health`` answers 503 while it loads; a server
without ``/health`` is ready once ``/v1/models`` answers) and reads its context
window where the server says it (llama.cpp's ``/props``, vLLM's ``max_model_len``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable

import aiohttp
import structlog

from llm_router.worker.settings import ModelConfig
from llm_router.worker.windows import Windows

log = structlog.get_logger("llm_router.warmup")

DEFAULT_OLLAMA = "http://localhost:11434"
#: How often a loading OpenAI-compatible server is asked again.
READY_POLL_S = 0.5
#: A load-only request may take this long (a cold 7B model from a slow disk).
LOAD_TIMEOUT_S = 600.0
#: Loads slower than this are logged as ``cold_load``.
COLD_LOAD_S = 1.0
#: Ollama's options (api/types.go: ``Runner``, then the predict options). litellm passes
#: a model's ``params`` of these names through as ``options``; the runner's decide
#: whether a request reloads the model.
RUNNER_OPTIONS = (
    "num_ctx",
    "num_batch",
    "num_gpu",
    "main_gpu",
    "use_mmap",
    "num_thread",
    "draft_num_predict",
)
OLLAMA_OPTIONS = frozenset(
    (
        *RUNNER_OPTIONS,
        *("num_keep", "seed", "num_predict", "top_k", "top_p", "min_p", "typical_p"),
        *("repeat_last_n", "temperature", "repeat_penalty", "presence_penalty"),
        *("frequency_penalty", "stop"),
    )
)


def ollama_options(cfg: ModelConfig) -> dict[str, object]:
    """The ``options`` every call of this model carries (litellm passes them through)."""
    return {k: v for k, v in cfg.params.items() if k in OLLAMA_OPTIONS}


def tagged(name: str) -> str:
    """Ollama's name for a model given without a tag: ``qwen2.5`` is ``qwen2.5:latest``."""
    return name if ":" in name else f"{name}:latest"


def load_ms(ollama_response: dict[str, object]) -> int | None:
    """Ollama's ``load_duration`` (nanoseconds) in milliseconds."""
    value = ollama_response.get("load_duration")
    return round(value / 1e6) if isinstance(value, int | float) else None


def note_load(cfg: ModelConfig, ms: int | None, **fields: object) -> None:
    if ms is not None and ms > COLD_LOAD_S * 1000:
        log.warning("cold_load", model=cfg.model, load_ms=ms, **fields)


class Warmer:
    """Load-only requests, at most one at a time per model; each tells ``windows`` the
    context the loaded model has."""

    def __init__(self, windows: Windows) -> None:
        self.windows = windows
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}

    def warm(self, models: Iterable[ModelConfig]) -> None:
        for cfg in models:
            if not cfg.is_local or (not cfg.is_ollama and not cfg.api_base):
                continue  # a local model without a server of its own: nothing to ask
            key = (cfg.api_base or DEFAULT_OLLAMA, cfg.name)
            running = self._tasks.get(key)
            if running is None or running.done():
                load = self._load(cfg) if cfg.is_ollama else self._wait_ready(cfg)
                self._tasks[key] = asyncio.get_running_loop().create_task(
                    load, name=f"warm {cfg.model}"
                )

    async def aclose(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def _load(self, cfg: ModelConfig) -> None:
        base = (cfg.api_base or DEFAULT_OLLAMA).rstrip("/")
        body: dict[str, object] = {"model": cfg.name, "messages": [], "stream": False}
        if cfg.keep_alive is not None:
            body["keep_alive"] = cfg.keep_alive
        if options := ollama_options(cfg):
            body["options"] = options
        timeout = aiohttp.ClientTimeout(total=LOAD_TIMEOUT_S)
        started = time.monotonic()
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.post(f"{base}/api/chat", json=body) as response:
                    data = await response.json(content_type=None)
                    if response.status >= 400:
                        raise RuntimeError(f"HTTP {response.status}: {str(data)[:200]}")
                # Ollama's answer to a load-only request carries no timings: the load is
                # its time.
                ms = (load_ms(data) if isinstance(data, dict) else None) or round(
                    (time.monotonic() - started) * 1000
                )
                note_load(cfg, ms, during="warm-up")
                # The window first: a ``model_warm`` line means what it may be sent is known.
                await self._learn_window(session, base, cfg)
                log.info("model_warm", model=cfg.model, load_ms=ms)
        except (aiohttp.ClientError, TimeoutError, ValueError, RuntimeError) as exc:
            log.warning("warm_up_failed", model=cfg.model, error=f"{type(exc).__name__}: {exc}")

    async def _learn_window(
        self, session: aiohttp.ClientSession, base: str, cfg: ModelConfig
    ) -> None:
        """``/api/ps`` lists the loaded models with the context each really has."""
        async with session.get(f"{base}/api/ps") as response:
            if response.status >= 400:
                return
            data = await response.json(content_type=None)
        models = data.get("models") if isinstance(data, dict) else None
        for entry in models if isinstance(models, list) else ():
            if not isinstance(entry, dict):
                continue
            if tagged(cfg.name) in {tagged(str(entry.get(k))) for k in ("name", "model")}:
                length = entry.get("context_length")
                if isinstance(length, int) and not isinstance(length, bool):
                    self.windows.learn(cfg, length, "Ollama /api/ps")
                return

    async def _wait_ready(self, cfg: ModelConfig) -> None:
        """An OpenAI-compatible server: wait while it loads, then learn its window."""
        assert cfg.api_base is not None
        api = cfg.api_base.rstrip("/")
        root = api.removesuffix("/v1")
        timeout = aiohttp.ClientTimeout(total=LOAD_TIMEOUT_S)
        started = time.monotonic()
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                while not await self._ready(session, root, api):
                    if time.monotonic() - started > LOAD_TIMEOUT_S:
                        raise TimeoutError(f"not ready in {LOAD_TIMEOUT_S:.0f}s")
                    await asyncio.sleep(READY_POLL_S)
                ms = round((time.monotonic() - started) * 1000)
                note_load(cfg, ms, during="warm-up")
                await self._learn_server_window(session, root, api, cfg)
                log.info("model_warm", model=cfg.model, load_ms=ms)
        except (aiohttp.ClientError, TimeoutError, ValueError, RuntimeError) as exc:
            log.warning("warm_up_failed", model=cfg.model, error=f"{type(exc).__name__}: {exc}")

    @staticmethod
    async def _ready(session: aiohttp.ClientSession, root: str, api: str) -> bool:
        """``/health``: 200 ready, 503 loading (llama.cpp); none there: ``/v1/models``."""
        async with session.get(f"{root}/health") as response:
            if response.status == 200:
                return True
            if response.status == 503:
                return False
        async with session.get(f"{api}/models") as response:
            if response.status >= 400:
                raise RuntimeError(f"{api}/models: HTTP {response.status}")
            return True

    async def _learn_server_window(
        self, session: aiohttp.ClientSession, root: str, api: str, cfg: ModelConfig
    ) -> None:
        """llama.cpp's ``/props`` (``default_generation_settings.n_ctx``), else vLLM's
        ``/v1/models`` (``max_model_len`` of this model)."""
        async with session.get(f"{root}/props") as response:
            data = await response.json(content_type=None) if response.status == 200 else None
        settings = data.get("default_generation_settings") if isinstance(data, dict) else None
        n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
        if isinstance(n_ctx, int) and not isinstance(n_ctx, bool) and n_ctx > 0:
            self.windows.learn(cfg, n_ctx, "llama.cpp /props")
            return
        async with session.get(f"{api}/models") as response:
            data = await response.json(content_type=None) if response.status == 200 else None
        entries = data.get("data") if isinstance(data, dict) else None
        for entry in entries if isinstance(entries, list) else ():
            if isinstance(entry, dict) and entry.get("id") == cfg.name:
                length = entry.get("max_model_len")
                if isinstance(length, int) and not isinstance(length, bool) and length > 0:
                    self.windows.learn(cfg, length, "/v1/models max_model_len")
                return
