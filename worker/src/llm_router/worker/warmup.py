"""A warm local model: loaded before the first job, and again when its breaker closes.

Ollama unloads a model that has been idle for 5 minutes unless a request's
``keep_alive`` says otherwise (every call of ours carries the model's
``keep_alive``, -1 = stay loaded), and it aborts a load when its client hangs up:
under an 8 s deadline a cold 7B model on a small server may never finish
loading. So the worker asks Ollama to load each local model with a load-only
request (``/api/chat`` with no messages) that has no short deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable

import aiohttp
import structlog

from llm_router.worker.settings import ModelConfig

log = structlog.get_logger("llm_router.warmup")

DEFAULT_OLLAMA = "http://localhost:11434"
#: A load-only request may take this long (a cold 7B model from a slow disk).
LOAD_TIMEOUT_S = 600.0
#: Loads slower than this are logged as ``cold_load``.
COLD_LOAD_S = 1.0


def load_ms(ollama_response: dict[str, object]) -> int | None:
    """Ollama's ``load_duration`` (nanoseconds) in milliseconds."""
    value = ollama_response.get("load_duration")
    return round(value / 1e6) if isinstance(value, int | float) else None


def note_load(cfg: ModelConfig, ms: int | None, **fields: object) -> None:
    if ms is not None and ms > COLD_LOAD_S * 1000:
        log.warning("cold_load", model=cfg.model, load_ms=ms, **fields)


class Warmer:
    """Load-only requests, at most one at a time per model."""

    def __init__(self) -> None:
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}

    def warm(self, models: Iterable[ModelConfig]) -> None:
        for cfg in models:
            if not cfg.is_local:
                continue
            key = (cfg.api_base or DEFAULT_OLLAMA, cfg.name)
            running = self._tasks.get(key)
            if running is None or running.done():
                self._tasks[key] = asyncio.get_running_loop().create_task(
                    self._load(cfg), name=f"warm {cfg.model}"
                )

    async def aclose(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    @staticmethod
    async def _load(cfg: ModelConfig) -> None:
        url = f"{(cfg.api_base or DEFAULT_OLLAMA).rstrip('/')}/api/chat"
        body = {"model": cfg.name, "messages": [], "stream": False, "keep_alive": cfg.keep_alive}
        if cfg.keep_alive is None:
            del body["keep_alive"]
        timeout = aiohttp.ClientTimeout(total=LOAD_TIMEOUT_S)
        started = time.monotonic()
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.post(url, json=body) as response,
            ):
                data = await response.json(content_type=None)
                if response.status >= 400:
                    raise RuntimeError(f"HTTP {response.status}: {str(data)[:200]}")
        except (aiohttp.ClientError, TimeoutError, ValueError, RuntimeError) as exc:
            log.warning("warm_up_failed", model=cfg.model, error=f"{type(exc).__name__}: {exc}")
            return
        # Ollama's answer to a load-only request carries no timings: the load is its time.
        ms = (load_ms(data) if isinstance(data, dict) else None) or round(
            (time.monotonic() - started) * 1000
        )
        log.info("model_warm", model=cfg.model, load_ms=ms)
        note_load(cfg, ms, during="warm-up")
