"""What makes an answer acceptable: no refusal, and JSON that fits the schema."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from jsonschema.protocols import Validator

from llm_router.client.protocol import Outcome, canonical_json, compile_schema

_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?(.*?)```", re.DOTALL)


# Models often write "I can\u2019t" with a typographic apostrophe instead of "I can't".
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


class RefusalDetector:
    """Case-insensitive substring match against a fixed list, lowered once."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self._patterns = [(p, p.lower().translate(_APOSTROPHES)) for p in patterns]

    def find(self, text: str) -> str | None:
        lower = text.lower().translate(_APOSTROPHES)
        for original, lowered in self._patterns:
            if lowered in lower:
                return original
        return None


def extract_json(text: str) -> Any:
    """Parse the whole text as JSON, else the first ```json fence that parses."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        first_error = exc
    for block in _FENCE.findall(text):
        try:
            return json.loads(block)
        except json.JSONDecodeError:
            continue
    raise first_error


def validator_for(schema: dict[str, Any]) -> Validator:
    """The compiled validator for a schema; compiled once per distinct schema."""
    return compile_schema(canonical_json(schema))


@dataclass(frozen=True, slots=True)
class Verdict:
    content: Any
    outcome: Outcome
    reason: str | None = None


def judge(text: str, refusals: RefusalDetector, validator: Validator | None) -> Verdict:
    """Apply the seed's rules in its order: refusal first, then JSON and schema."""
    pattern = refusals.find(text)
    if pattern is not None:
        return Verdict(None, "rejected", f"RefusalPattern matched: {pattern!r}")
    if validator is None:
        return Verdict(text, "success")
    try:
        parsed = extract_json(text)
    except json.JSONDecodeError as exc:
        return Verdict(None, "invalid", f"JSONDecodeError: {exc}")
    error = next(iter(validator.iter_errors(parsed)), None)
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        return Verdict(None, "invalid", f"SchemaValidationError at {where}: {error.message[:300]}")
    return Verdict(parsed, "success")
