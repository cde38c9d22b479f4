"""Real tokenizers to hold the token estimate against, all from files litellm ships.

tiktoken's OpenAI encodings (``cl100k_base``: GPT-4; ``o200k_base``: GPT-4o;
``p50k_base``: GPT-3, an English-trained 50k vocabulary like small local models'),
and the Hugging Face tokenizers of Claude (its public, pre-Claude-3 one) and DeepSeek
(a 128k multilingual vocabulary like Qwen's). Nothing is fetched: tiktoken reads
litellm's bundled copies, and a miss raises instead of downloading.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

Count = Callable[[str], int]
TIKTOKEN = ("cl100k_base", "o200k_base", "p50k_base")
HF = {"claude": "anthropic_tokenizer.json", "deepseek": "deepseek_tokenizer.json"}


def _no_download(blobpath: str) -> bytes:
    raise RuntimeError(f"tiktoken wanted to download {blobpath}; only bundled files are used")


@functools.cache
def tokenizers() -> dict[str, Count]:
    """Name -> a function counting a text's tokens."""
    import litellm.litellm_core_utils.default_encoding as bundled  # sets TIKTOKEN_CACHE_DIR
    import tiktoken
    import tiktoken.load
    from tokenizers import Tokenizer

    tiktoken.load.read_file = _no_download
    folder = Path(os.path.dirname(bundled.__file__)) / "tokenizers"
    counts: dict[str, Count] = {}
    for name in TIKTOKEN:
        encoding = tiktoken.get_encoding(name)
        counts[name] = functools.partial(_tiktoken_count, encoding)
    for name, file in HF.items():
        tokenizer = Tokenizer.from_file(str(folder / file))
        counts[name] = functools.partial(_hf_count, tokenizer)
    return counts


def _tiktoken_count(encoding: object, text: str) -> int:
    return len(encoding.encode(text, disallowed_special=()))  # type: ignore[attr-defined]


def _hf_count(tokenizer: object, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False).ids)  # type: ignore[attr-defined]


TEXTS = Path(__file__).resolve().parent / "texts"


def sample_texts() -> dict[str, str]:
    """English and Polish prose, Python code, pretty and compact JSON, other scripts."""
    import json

    texts = {
        "english": (TEXTS / "en.txt").read_text(),
        "polish": (TEXTS / "pl.txt").read_text(),
        "code": (TEXTS / "code.py.txt").read_text(),
        "json": (TEXTS / "data.json").read_text(),
    }
    texts["json (compact)"] = json.dumps(json.loads(texts["json"]), separators=(",", ":"))
    texts["cyrillic, CJK, emoji"] = "Hello 👋🏽 世界! Привет, мир. Заказ №17 оплачен. " * 20
    return texts
