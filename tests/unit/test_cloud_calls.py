"""What a cloud call is sent and what it may cost at worst: prompt-cache marks, max_tokens."""

from __future__ import annotations

from typing import Any

import litellm
import pytest

from llm_router.worker.calls import build_kwargs, cacheable_system, max_output_tokens
from llm_router.worker.costs import FRAMING_TOKENS, worst_case_usd
from llm_router.worker.settings import ModelConfig

HAIKU = "anthropic/claude-haiku-4-5-20251001"


def test_cacheable_system_marks_only_the_last_system_message() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "a"},
        {"role": "system", "content": [{"type": "text", "text": "b"}]},
        {"role": "user", "content": "c"},
    ]
    marked = cacheable_system(messages)
    assert marked[0] == messages[0]
    assert marked[1]["content"] == [
        {"type": "text", "text": "b", "cache_control": {"type": "ephemeral"}}
    ]
    assert marked[2] == messages[2]
    assert messages[1]["content"] == [{"type": "text", "text": "b"}]  # not changed in place
    assert cacheable_system([{"role": "user", "content": "x"}]) == [
        {"role": "user", "content": "x"}
    ]


def test_cache_prompt_only_changes_anthropic_calls() -> None:
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    cached = ModelConfig(model=HAIKU, timeout=5, cache_prompt=True)
    plain = ModelConfig(model=HAIKU, timeout=5)
    local = ModelConfig(model="ollama_chat/qwen2.5:7b", timeout=5, cache_prompt=True)
    assert build_kwargs(cached, messages, None, 100)["messages"][0]["content"][0][
        "cache_control"
    ] == {"type": "ephemeral"}
    assert build_kwargs(plain, messages, None, 100)["messages"] == messages
    assert build_kwargs(local, messages, None, 100)["messages"] == messages


def test_max_output_tokens_follows_what_the_call_sends() -> None:
    assert max_output_tokens(ModelConfig(model=HAIKU, timeout=5), 321) == 321
    with_param = ModelConfig(model=HAIKU, timeout=5, params={"max_tokens": 77})
    assert max_output_tokens(with_param, 321) == 77
    assert build_kwargs(with_param, [], None, 321)["max_tokens"] == 77  # params win there too
    other = ModelConfig(model="openai/gpt-4o-mini", timeout=5)
    assert (
        max_output_tokens(other, 321)
        == litellm.get_model_info("openai/gpt-4o-mini")["max_output_tokens"]
    )


def test_worst_case_prices_every_byte_at_the_cache_write_price() -> None:
    worst = worst_case_usd(HAIKU, 1000, 64)
    # Haiku 4.5: cache writes $1.25/MTok (above input's $1), output $5/MTok.
    assert worst == pytest.approx((1000 + FRAMING_TOKENS) * 1.25e-6 + 64 * 5e-6)
    assert worst_case_usd("ollama_chat/never-heard-of-it", 1000, 64) == 0.0


def test_importing_any_worker_module_keeps_litellm_offline() -> None:
    """Whichever module imports litellm first, it never tries the internet for prices."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("LITELLM_")}
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            "import llm_router.worker.costs, os; print(os.environ['LITELLM_LOCAL_MODEL_COST_MAP'])",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "True"
    assert "fetch" not in run.stderr.lower()
    assert "githubusercontent" not in run.stderr


def test_the_warm_up_looks_up_no_host() -> None:
    """Start-up loads what litellm needs from its own files: no name is resolved."""
    import os
    import subprocess
    import sys

    code = (
        "import socket\n"
        "asked = []\n"
        "real = socket.getaddrinfo\n"
        "def spy(host, *a, **k):\n"
        "    asked.append(host)\n"
        "    return real(host, *a, **k)\n"
        "socket.getaddrinfo = spy\n"
        "from llm_router.worker import calls\n"
        "calls.warm_up()\n"
        "print(asked)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LITELLM_")}
    env.pop("TIKTOKEN_CACHE_DIR", None)
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
