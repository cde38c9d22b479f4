"""What makes an answer acceptable: whole, no refusal, and JSON that fits the schema.

The answer is hostile input too (the caller steers it through the prompt), so
every check has a bound: the answer's size and nesting depth, and a CPU-time
budget for validating it (:mod:`llm_router.client.keywords`). A verdict is always
returned, never an exception: an answer too big, too deep or too costly to check
is ``invalid``, and the chain moves on as for any other bad JSON.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import structlog
from jsonschema.protocols import Validator

from llm_router.client.keywords import BudgetExceeded, metered_budget
from llm_router.client.protocol import Outcome
from llm_router.client.schemas import CEILING, SchemaLimits, compile_schema
from llm_router.client.untrusted import loads, problem
from llm_router.worker.offload import Offload

log = structlog.get_logger("llm_router.checks")

_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?(.*?)```", re.DOTALL)

#: Answers up to this many characters are judged on the event loop, within
#: :data:`INLINE_SECONDS` of CPU; bigger ones, or ones that need longer, in a thread.
INLINE_CHARS = 16_384
INLINE_SECONDS = 0.005

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
    """Parse the whole text as JSON, else the first ```json fence that parses.

    Raises ``ValueError`` (a :class:`json.JSONDecodeError` when it is not JSON at
    all), or ``RecursionError`` when it is nested too deeply to parse.
    """
    try:
        return loads(text)
    except ValueError as exc:
        first_error = exc
    for block in _FENCE.findall(text):
        try:
            return loads(block)
        except ValueError:
            continue
    raise first_error


def validator_for(schema: dict[str, Any], limits: SchemaLimits = CEILING) -> Validator:
    """The compiled validator for a schema; compiled once per distinct schema."""
    return compile_schema(schema, limits).validator


@dataclass(frozen=True, slots=True)
class Finish:
    """How the provider said the answer ended.

    ``reason`` is litellm's OpenAI-style word (``stop``, ``length``, ``content_filter``,
    ``tool_calls``); ``provider_reason`` the provider's own (Anthropic's ``stop_reason``,
    Ollama's ``done_reason``), which wins where litellm hid it.
    """

    reason: str | None = "stop"
    provider_reason: str | None = None
    #: What a cut-off answer ran into, for the reason: ``max_tokens (4096)`` ...
    limit: str | None = None
    refusal_category: str | None = None
    refusal_explanation: str | None = None

    @property
    def refused(self) -> bool:
        return self.reason == "content_filter" or self.provider_reason == "refusal"

    @property
    def truncated(self) -> bool:
        return not self.refused and (self.reason == "length" or self.provider_reason in _CUT_OFF)

    @property
    def word(self) -> str | None:
        """The OpenAI-style finish reason, corrected by the provider's own word."""
        if self.refused:
            return "content_filter"
        return "length" if self.truncated else self.reason


WINDOW_FULL = "model_context_window_exceeded"
#: Provider words for an answer that stopped before it was whole.
_CUT_OFF = frozenset({"length", "max_tokens", WINDOW_FULL})


@dataclass(frozen=True, slots=True)
class AnswerLimits:
    """What one answer may cost to check (the worker's ``max_answer_*`` settings)."""

    max_bytes: int = 1_000_000
    max_depth: int = 64
    max_seconds: float = 1.0


@dataclass(frozen=True, slots=True)
class Verdict:
    content: Any
    outcome: Outcome
    reason: str | None = None


def _invalid(reason: str) -> Verdict:
    return Verdict(None, "invalid", reason)


def _size_problem(text: str, limit: int) -> str | None:
    if len(text) * 4 <= limit:  # a character is at most 4 bytes of UTF-8
        return None
    size = len(text.encode("utf-8", "surrogatepass"))
    if size <= limit:
        return None
    return f"AnswerTooLarge: {size:,} bytes, more than max_answer_bytes ({limit:,})"


def provider_refusal(finish: Finish) -> str:
    """``ProviderRefusal: <category>: <explanation>``, as much of it as the provider gave."""
    said = [p for p in (finish.refusal_category, finish.refusal_explanation) if p]
    if not said:
        said = [f"the provider stopped the answer ({finish.provider_reason or finish.reason})"]
    text = "ProviderRefusal: " + ": ".join(said).replace("\n", " ")
    return text if len(text) <= 300 else text[:299] + "…"


def truncated(finish: Finish) -> str:
    return f"Truncated: the answer was cut off at {finish.limit or 'its token limit'}"


#: A cut-off answer passes only as one of these: their closing bracket or quote shows the
#: JSON ended before the cut (a number or a literal cut short may still parse).
_CLOSED = (dict, list, str)

WHOLE = Finish()


def judge(
    text: str,
    refusals: RefusalDetector,
    validator: Validator | None,
    limits: AnswerLimits = AnswerLimits(),
    *,
    finish: Finish = WHOLE,
    seconds: float | None = None,
    share_gil: bool = False,
) -> Verdict:
    """The provider's word first (a refusal, a cut-off answer), then the seed's rules in
    its order: refusal patterns, then JSON and schema.

    A cut-off answer is ``rejected`` unless a schema was asked for and the answer is a
    JSON object, array or string that fits it: that JSON was whole before the cut.

    With ``seconds`` (a smaller budget than the limits'), running out of it raises
    :class:`BudgetExceeded` instead of giving a verdict, so the caller can go on
    with the full budget elsewhere. ``share_gil``: see :class:`~llm_router.client.keywords.Budget`.
    """
    if (too_large := _size_problem(text, limits.max_bytes)) is not None:
        return _invalid(too_large)
    if finish.refused:
        return Verdict(None, "rejected", provider_refusal(finish))
    if finish.truncated and (validator is None or not text):
        return Verdict(None, "rejected", truncated(finish))
    if not text:
        return Verdict(None, "rejected", "EmptyResponse: the model returned no text")
    pattern = refusals.find(text)
    if pattern is not None:
        return Verdict(None, "rejected", f"RefusalPattern matched: {pattern!r}")
    if validator is None:
        return Verdict(text, "success")
    verdict = _json_verdict(text, validator, limits, seconds, share_gil)
    whole = verdict.outcome == "success" and isinstance(verdict.content, _CLOSED)
    if finish.truncated and not whole:
        return Verdict(None, "rejected", truncated(finish))
    return verdict


def _json_verdict(
    text: str,
    validator: Validator,
    limits: AnswerLimits,
    seconds: float | None,
    share_gil: bool,
) -> Verdict:
    try:
        parsed = extract_json(text)
    except json.JSONDecodeError as exc:
        return _invalid(f"JSONDecodeError: {exc}")
    except ValueError as exc:
        return _invalid(f"JSONDecodeError: {str(exc)[:200]}")
    except RecursionError:
        return _invalid("AnswerTooDeep: the JSON is nested too deeply to parse")
    if (why := problem(parsed, limits.max_depth, "max_answer_depth")) is not None:
        return _invalid(f"AnswerNotAcceptable: the JSON {why}")
    budget = seconds if seconds is not None else limits.max_seconds
    try:
        with metered_budget(budget, share_gil):
            error = next(iter(validator.iter_errors(parsed)), None)
    except BudgetExceeded as exc:
        if seconds is not None:
            raise
        return _invalid(
            f"ValidationTooCostly: {exc} (max_check_seconds): the schema makes this answer "
            "too costly to check"
        )
    except RecursionError:
        return _invalid("AnswerTooDeep: the JSON is nested too deeply to validate")
    except MemoryError:
        return _invalid("ValidationFailed: out of memory while validating")
    except Exception as exc:  # a bug or an edge of jsonschema: still a verdict, and a log line
        log.warning("validation_error", error_type=type(exc).__name__)  # no answer text
        return _invalid(f"ValidationFailed: {type(exc).__name__}: {exc}"[:300])
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        return _invalid(f"SchemaValidationError at {where}: {error.message[:300]}")
    return Verdict(parsed, "success")


class AnswerChecks:
    """Judges answers where they cost the event loop nothing that matters: small and
    cheap ones inline, the rest in the checks thread."""

    def __init__(self, refusals: RefusalDetector, limits: AnswerLimits, offload: Offload) -> None:
        self.refusals = refusals
        self.limits = limits
        self.offload = offload

    async def judge(
        self, text: str, validator: Validator | None, finish: Finish = WHOLE
    ) -> Verdict:
        if len(text) <= INLINE_CHARS:
            try:
                return judge(
                    text,
                    self.refusals,
                    validator,
                    self.limits,
                    finish=finish,
                    seconds=INLINE_SECONDS,
                )
            except BudgetExceeded:
                pass
        return await self.offload.run(
            judge, text, self.refusals, validator, self.limits, finish=finish, share_gil=True
        )
