"""llm-router's worker: the local-first chain, usable in-process or as an arq daemon.

``Router`` is the seed's ``LLMRouter`` grown up::

    from llm_router.worker import Router, load_settings

    router = Router(load_settings())
    result = await router.route(messages, schema=..., context="supervisor.reconcile")

Names are imported lazily: ``import litellm`` costs seconds, and the command's
settings check (or a settings error) should not wait for it.
"""

from __future__ import annotations

import os
from importlib import import_module

# Before any module of the worker imports litellm: no price list, header config or
# anything else from the internet; litellm's bundled model-cost map instead.
os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llm_router.worker.router import Router
    from llm_router.worker.settings import ConfigError, ModelConfig, Settings, load_settings

_EXPORTS = {
    "Router": "llm_router.worker.router",
    "ConfigError": "llm_router.worker.settings",
    "ModelConfig": "llm_router.worker.settings",
    "Settings": "llm_router.worker.settings",
    "load_settings": "llm_router.worker.settings",
}

__all__ = ["ConfigError", "ModelConfig", "Router", "Settings", "load_settings"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
