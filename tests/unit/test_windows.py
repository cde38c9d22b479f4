"""The context-window check: the token estimate against real tokenizers, and the verdicts."""

from __future__ import annotations

import pytest

from llm_router.worker.settings import ModelConfig
from llm_router.worker.windows import (
    DEFAULT_ANSWER_RESERVE,
    OLLAMA_DEFAULT_CONTEXT,
    Prompt,
    Window,
    Windows,
    estimate_tokens,
    text_tokens,
)
from llm_router_testing.tokenizers import sample_texts, tokenizers

LOCAL = ModelConfig(model="ollama_chat/qwen2.5:7b", timeout=8, api_base="http://127.0.0.1:9")
HAIKU = ModelConfig(model="anthropic/claude-haiku-4-5-20251001", timeout=30)
LATIN = ("english", "polish", "code", "json", "json (compact)")


@pytest.mark.parametrize("name", LATIN)
def test_the_estimate_is_never_far_below_a_real_tokenizer(name: str) -> None:
    """English, Polish, code and JSON: at least 0.9 of every tokenizer's count (an
    English-trained 50k vocabulary cuts Polish finest), at most 1.6 times."""
    text = sample_texts()[name]
    estimate = text_tokens(text)
    for tokenizer, count in tokenizers().items():
        real = count(text)
        assert estimate >= 0.9 * real, (tokenizer, estimate, real)
        assert estimate <= 1.6 * real, (tokenizer, estimate, real)


def test_other_scripts_are_not_under_counted_by_multilingual_tokenizers() -> None:
    text = sample_texts()["cyrillic, CJK, emoji"]
    estimate = text_tokens(text)
    for tokenizer in ("cl100k_base", "o200k_base", "claude", "deepseek"):
        assert estimate >= tokenizers()[tokenizer](text), tokenizer


def test_the_estimate_grows_with_the_text_and_counts_every_message() -> None:
    one = [{"role": "user", "content": "hello there"}]
    two = [{"role": "system", "content": "be brief"}, *one]
    assert text_tokens("") == 0
    assert text_tokens("a" * 4000) > text_tokens("a" * 400) > 0
    assert estimate_tokens(two) > estimate_tokens(one)
    blocks = [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]
    assert estimate_tokens(blocks) == estimate_tokens(one)
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert estimate_tokens(image) >= 768  # an image is not free


def test_polish_counts_more_than_english_of_the_same_length() -> None:
    english = sample_texts()["english"][:2000]
    polish = sample_texts()["polish"][:2000]
    assert text_tokens(polish) > 1.3 * text_tokens(english)


def windows_for(**local: object) -> tuple[Windows, ModelConfig]:
    cfg = ModelConfig(model="ollama_chat/qwen2.5:7b", timeout=8, api_base="http://127.0.0.1:9")
    return Windows(4096), cfg.model_copy(update=local)


def prompt_of(chars: int) -> Prompt:
    return Prompt([{"role": "user", "content": "word " * (chars // 5)}])


async def test_a_prompt_well_inside_the_window_is_never_skipped() -> None:
    windows, cfg = windows_for()
    # Half the window in characters: a token is never shorter than a byte.
    assert await windows.misfit(cfg, prompt_of(OLLAMA_DEFAULT_CONTEXT // 2)) is None
    # Half the window in estimated tokens is inside too.
    text = "The invoice was paid on time. " * 50
    assert text_tokens(text) < OLLAMA_DEFAULT_CONTEXT // 2
    assert await windows.misfit(cfg, Prompt([{"role": "user", "content": text}])) is None


async def test_a_prompt_over_the_window_is_skipped_with_its_numbers() -> None:
    windows, cfg = windows_for()
    reason = await windows.misfit(cfg, prompt_of(40_000))
    assert reason is not None
    assert reason.startswith("context: ~")
    assert f"+ {DEFAULT_ANSWER_RESERVE} for the answer > 4,096 (Ollama's default)" in reason


async def test_where_a_local_window_comes_from() -> None:
    windows, cfg = windows_for()
    assert windows.window(cfg).tokens == OLLAMA_DEFAULT_CONTEXT  # type: ignore[union-attr]
    _, with_num_ctx = windows_for(params={"num_ctx": 16384})
    assert windows.window(with_num_ctx) == Window(16384, "num_ctx")
    windows.learn(with_num_ctx, 12_000, "Ollama /api/ps")
    assert windows.window(with_num_ctx).tokens == 12_000  # type: ignore[union-attr]
    _, configured = windows_for(context_window=2048, params={"num_ctx": 16384})
    windows.learn(configured, 32_768, "Ollama /api/ps")  # the setting wins over the server
    assert windows.window(configured).tokens == 2048  # type: ignore[union-attr]
    # Learned per server: the same model at its server has one loaded runner.
    assert windows.window(cfg).tokens == 12_000  # type: ignore[union-attr]
    fresh = Windows(4096)
    fresh.learn(cfg, 0, "Ollama /api/ps")  # nothing learned from nonsense
    assert fresh.window(cfg).tokens == OLLAMA_DEFAULT_CONTEXT  # type: ignore[union-attr]


async def test_the_answer_reserve_follows_the_output_limit() -> None:
    windows, cfg = windows_for(params={"num_predict": 1000})
    assert windows.reserve(cfg) == 1000
    assert windows.reserve(HAIKU) == 4096  # what every Anthropic call asks for
    assert windows.reserve(cfg.model_copy(update={"params": {}})) == DEFAULT_ANSWER_RESERVE
    # 4096 - 8 - 4 - 1000 fits exactly at a token a byte; a byte more does not.
    assert await windows.misfit(cfg, Prompt([{"role": "user", "content": "x" * 3084}])) is None


async def test_cloud_windows_come_from_litellm_and_unknown_models_are_not_checked() -> None:
    windows = Windows(4096)
    window = windows.window(HAIKU)
    assert window is not None
    assert window.source == "litellm"
    assert window.tokens >= 200_000
    assert await windows.misfit(HAIKU, prompt_of(400_000)) is None
    unknown = ModelConfig(model="openai/some-local-thing", timeout=5)
    assert windows.window(unknown) is None
    assert await windows.misfit(unknown, prompt_of(10_000_000)) is None


def test_another_local_servers_window_is_its_own_until_it_says() -> None:
    windows = Windows(4096)
    llama = ModelConfig(
        model="openai/smollm2", timeout=5, api_base="http://127.0.0.1:1/v1", local=True
    )
    assumed = windows.window(llama)
    assert assumed is not None
    assert (assumed.tokens, assumed.source) == (OLLAMA_DEFAULT_CONTEXT, "a local server's assumed")
    ignored = llama.model_copy(update={"params": {"num_ctx": 16384}})  # Ollama's option
    assert windows.window(ignored).tokens == OLLAMA_DEFAULT_CONTEXT  # type: ignore[union-attr]
    windows.learn(llama, 2048, "llama.cpp /props")
    assert windows.window(llama) == Window(2048, "llama.cpp /props")


async def test_a_prompt_is_measured_once() -> None:
    prompt = prompt_of(100_000)
    first = await prompt.tokens()
    prompt.messages.append({"role": "user", "content": "more " * 10_000})
    assert await prompt.tokens() == first  # cached for the other models of the chain
