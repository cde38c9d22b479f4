"""Does a prompt fit a model's context window? Asked before the call, never after.

Ollama does not refuse a prompt longer than its context (``num_ctx``): it drops the
oldest messages, keeps the system message and the last one, and answers what is left,
an answer that may pass every check while it ignored most of the input. So each model
has a window (its ``context_window`` setting; for Ollama, what ``/api/ps`` says once the
warm-up has loaded it, else its ``num_ctx``, else Ollama's smallest default; for cloud
models, litellm's ``max_input_tokens``), and a prompt whose estimate plus the answer's
reserve does not fit skips the model (attempt ``skipped``, reason ``context: …``),
holding no capacity slot and no budget.

The estimate needs no tokenizer (none to download, none to load): it counts the
pieces tokenizers split text into, with weights that err towards more tokens for
English, code and JSON, and far more for text with letters beyond ASCII, which
tokenizers trained mostly on English cut into short pieces. ``bench/tokens.py``
measures it against real tokenizers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from llm_router.worker.offload import Offload
from llm_router.worker.settings import ModelConfig

log = structlog.get_logger("llm_router.windows")

#: Ollama's context when nothing else is known: the smallest of its defaults (4k, 32k or
#: 256k by the GPU's memory in current releases; 4k in 0.6 to 0.11).
OLLAMA_DEFAULT_CONTEXT = 4096
#: Tokens kept for a local model's answer when its output has no limit of its own.
DEFAULT_ANSWER_RESERVE = 256
#: A message's framing in a chat template (``<|im_start|>user\n … <|im_end|>\n``).
MESSAGE_TOKENS = 4
#: The answer's opening (``<|im_start|>assistant\n``) and a margin.
PROMPT_TOKENS = 8
#: What a content block that is not text (an image) is counted as: Ollama's own guess.
MEDIA_TOKENS = 768

_ASCII_WORDS = re.compile(r"[A-Za-z]+")
_NOT_DIGITS = re.compile(r"[^0-9]+")
_WIDE = re.compile(r"[^\x00-\x7f]")
_WIDE_LETTERS = re.compile(r"[^\W\d_A-Za-z]")
#: A text with more letters beyond ASCII than this share of its characters is taken for
#: a language other than English (Polish has about 7 %).
_FOREIGN_SHARE = 0.005


def text_tokens(text: str) -> int:
    """A conservative token count for one text: a few passes of C-level work, no
    tokenizer. Weights measured in ``bench/tokens.py``."""
    if not text:
        return 0
    words = _ASCII_WORDS.findall(text)
    letters = sum(map(len, words))
    digits = len(_NOT_DIGITS.sub("", text))
    newlines = text.count("\n")
    spaces = text.count(" ") + text.count("\t")
    if text.isascii():
        wide = wide_letters = 0
    else:
        wide = len(_WIDE.findall(text))
        wide_letters = len(_WIDE_LETTERS.findall(text))
    marks = len(text) - letters - digits - newlines - spaces - wide  # ASCII punctuation
    if wide_letters > _FOREIGN_SHARE * len(text):
        # Vocabularies trained mostly on English cut other languages' words into pieces
        # of two or three letters.
        tokens = math.ceil(letters / 2.5 + len(words) / 2)
    else:  # a common English word is a token; a long one, one more per 3 letters or so
        tokens = len(words) + max(0, letters - 3 * len(words)) // 3
    tokens += digits  # one a digit: Qwen and Llama split numbers into digits
    tokens += newlines + text.count("  ") // 2 + math.ceil(marks * 0.6)
    tokens += wide_letters  # an accented Latin letter, a Cyrillic or CJK one: a token each
    tokens += 2 * (wide - wide_letters)  # emoji, typographic marks: several bytes, 2 tokens
    return tokens


def content_tokens(content: Any) -> int:
    if isinstance(content, str):
        return text_tokens(content)
    total = 0
    for block in content if isinstance(content, list) else ():
        if isinstance(block, Mapping) and isinstance(block.get("text"), str):
            total += text_tokens(block["text"])
        else:
            total += MEDIA_TOKENS
    return total


def estimate_tokens(messages: Iterable[Mapping[str, Any]]) -> int:
    """The prompt's tokens as a chat template lays the messages out, rounded up."""
    total = PROMPT_TOKENS
    for message in messages:
        total += MESSAGE_TOKENS + content_tokens(message.get("content"))
    return total


def bytes_bound(messages: Iterable[Mapping[str, Any]]) -> int:
    """At least as many tokens as any tokenizer makes of these messages (a token is at
    least a byte), or -1 when there is no such cheap bound (content blocks)."""
    total = PROMPT_TOKENS
    for message in messages:
        content = message.get("content")
        if not isinstance(content, str):
            return -1
        total += MESSAGE_TOKENS + len(content.encode("utf-8", "surrogatepass"))
    return total


@dataclass(frozen=True, slots=True)
class Window:
    """A model's context window in tokens, and where that number came from."""

    tokens: int
    source: str


class Windows:
    """The window and answer reserve of each model, learned or configured, and the check."""

    def __init__(self, anthropic_max_tokens: int = 4096) -> None:
        self.anthropic_max_tokens = anthropic_max_tokens
        self._learned: dict[str, Window] = {}

    def learn(self, cfg: ModelConfig, tokens: int, source: str) -> None:
        """A window the server reported: at warm-up (Ollama's ``/api/ps``, llama.cpp's
        ``/props``, vLLM's ``/v1/models``), or in refusing a prompt over it."""
        if tokens <= 0 or cfg.context_window is not None:
            return
        window = Window(tokens, source)
        if self._learned.get(cfg.endpoint) != window:
            self._learned[cfg.endpoint] = window
            log.info("context_window", model=cfg.model, tokens=tokens, source=source)

    def window(self, cfg: ModelConfig) -> Window | None:
        if cfg.context_window is not None:
            return Window(cfg.context_window, "context_window")
        if cfg.is_local:
            if (learned := self._learned.get(cfg.endpoint)) is not None:
                return learned
            num_ctx = cfg.params.get("num_ctx")
            if cfg.is_ollama and isinstance(num_ctx, int) and num_ctx > 0:
                return Window(num_ctx, "num_ctx")
            # Another local server's window is its own setting (llama.cpp's -c), read at
            # warm-up where it says it; until then, as small as Ollama's smallest.
            source = "Ollama's default" if cfg.is_ollama else "a local server's assumed"
            return Window(OLLAMA_DEFAULT_CONTEXT, source)
        return _litellm_window(cfg.model)

    def reserve(self, cfg: ModelConfig) -> int:
        """Tokens the answer may take out of the same window."""
        if cfg.output_limit is not None:
            return cfg.output_limit
        if cfg.is_anthropic:  # what every call asks for; input and answer share the window
            return self.anthropic_max_tokens
        # A local server's answer grows into the prompt's window; litellm's cloud windows
        # are the input's alone.
        return DEFAULT_ANSWER_RESERVE if cfg.is_local else 0

    def log_known(self, models: Iterable[ModelConfig]) -> None:
        """One line per model at start-up: what it may be sent."""
        seen: set[str] = set()
        for cfg in models:
            if cfg.endpoint in seen:
                continue
            seen.add(cfg.endpoint)
            window = self.window(cfg)
            if window is None:
                log.info("context_window", model=cfg.model, tokens=None, source="unknown")
            else:
                log.info(
                    "context_window", model=cfg.model, tokens=window.tokens, source=window.source
                )

    async def misfit(self, cfg: ModelConfig, prompt: Prompt) -> str | None:
        """Why the prompt does not fit the model (the ``skipped`` reason), or None."""
        window = self.window(cfg)
        if window is None:
            return None
        reserve = self.reserve(cfg)
        if prompt.bound >= 0 and prompt.bound + reserve <= window.tokens:
            return None  # fits even at a token a byte: no need to estimate
        tokens = await prompt.tokens()
        if tokens + reserve <= window.tokens:
            return None
        return (
            f"context: ~{tokens:,} tokens + {reserve:,} for the answer > "
            f"{window.tokens:,} ({window.source})"
        )


#: Prompts longer than this are measured in the checks thread (about 30 µs of CPU a KB).
INLINE_CHARS = 65_536


class Prompt:
    """One request's messages, measured once however many models look at them."""

    def __init__(self, messages: list[dict[str, Any]], offload: Offload | None = None) -> None:
        self.messages = messages
        self.offload = offload
        self._bound: int | None = None
        self._tokens: int | None = None

    @property
    def bound(self) -> int:
        if self._bound is None:
            self._bound = bytes_bound(self.messages)
        return self._bound

    async def tokens(self) -> int:
        if self._tokens is None:
            large = self.bound < 0 or self.bound > INLINE_CHARS
            if large and self.offload is not None:
                self._tokens = await self.offload.run(estimate_tokens, self.messages)
            else:
                self._tokens = estimate_tokens(self.messages)
        return self._tokens


def _litellm_window(model: str) -> Window | None:
    import litellm

    try:
        found = litellm.get_model_info(model).get("max_input_tokens")
    except Exception:
        return None
    return Window(found, "litellm") if isinstance(found, int) and found > 0 else None
