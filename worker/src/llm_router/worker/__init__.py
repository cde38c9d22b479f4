"""llm-router's worker: the local-first chain, usable in-process or as an arq daemon.

``Router`` is the seed's ``LLMRouter`` grown up::

    router = Router(load_settings())
    result = await router.route(messages, schema=..., context="supervisor.reconcile")
"""

from llm_router.worker.router import Router
from llm_router.worker.settings import ConfigError, ModelConfig, Settings, load_settings

__all__ = ["ConfigError", "ModelConfig", "Router", "Settings", "load_settings"]
