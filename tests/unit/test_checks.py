"""What makes an answer acceptable: refusals, JSON extraction, schema validation."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llm_router.worker.checks import Finish, RefusalDetector, extract_json, judge, validator_for
from llm_router.worker.settings import DEFAULT_REFUSAL_PATTERNS

SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["action", "steps"],
    "properties": {
        "action": {"type": "string"},
        "steps": {"type": "array", "items": {"type": "integer"}},
    },
}


@pytest.fixture
def refusals() -> RefusalDetector:
    return RefusalDetector(DEFAULT_REFUSAL_PATTERNS)


def test_seed_patterns_include_polish() -> None:
    assert "nie wiem" in DEFAULT_REFUSAL_PATTERNS
    assert len(DEFAULT_REFUSAL_PATTERNS) == 10


@pytest.mark.parametrize("pattern", DEFAULT_REFUSAL_PATTERNS)
@pytest.mark.parametrize("transform", [str, str.lower, str.upper, str.swapcase])
def test_every_default_pattern_is_found_case_insensitively(
    refusals: RefusalDetector, pattern: str, transform: Any
) -> None:
    text = f"Well... {transform(pattern)}, sorry."
    assert refusals.find(text) == pattern


def test_polish_refusal(refusals: RefusalDetector) -> None:
    assert refusals.find("Szczerze mówiąc, NIE WIEM.") == "nie wiem"
    assert refusals.find("Nie Wiem") == "nie wiem"


def test_plain_answer_is_not_a_refusal(refusals: RefusalDetector) -> None:
    assert refusals.find("The capital of France is Paris.") is None
    assert refusals.find("") is None


def test_custom_patterns() -> None:
    detector = RefusalDetector(["Computer Says No"])
    assert detector.find("well, computer says no!") == "Computer Says No"
    assert detector.find("I cannot") is None


def test_extract_json_whole_text() -> None:
    assert extract_json('{"a": 1}') == {"a": 1}
    assert extract_json("  [1, 2]\n") == [1, 2]


def test_extract_json_json_fence() -> None:
    assert extract_json('```json\n{"a": 1}\n```') == {"a": 1}
    assert extract_json('```JSON\n{"a": 2}\n```') == {"a": 2}


def test_extract_json_bare_fence() -> None:
    assert extract_json('```\n{"a": [1, 2]}\n```') == {"a": [1, 2]}


def test_extract_json_text_around_fence() -> None:
    text = 'Here you go:\n```json\n{"action": "go"}\n```\nHope this helps!'
    assert extract_json(text) == {"action": "go"}


def test_extract_json_skips_fences_that_do_not_parse() -> None:
    text = "```python\nprint('hi')\n```\nand\n```json\n{\"ok\": true}\n```"
    assert extract_json(text) == {"ok": True}


def test_extract_json_invalid_raises_decode_error() -> None:
    with pytest.raises(json.JSONDecodeError):
        extract_json("definitely not json")
    with pytest.raises(json.JSONDecodeError):
        extract_json("```json\n{broken\n```")


def test_validator_for_is_cached() -> None:
    assert validator_for(SCHEMA) is validator_for(dict(reversed(list(SCHEMA.items()))))


def test_judge_refusal_wins_over_valid_json(refusals: RefusalDetector) -> None:
    text = '{"action": "I cannot do that", "steps": [1]}'
    verdict = judge(text, refusals, validator_for(SCHEMA))
    assert verdict.outcome == "rejected"
    assert verdict.content is None
    assert verdict.reason is not None
    assert "RefusalPattern" in verdict.reason
    assert "I cannot" in verdict.reason


def test_judge_refusal_without_schema(refusals: RefusalDetector) -> None:
    verdict = judge("As an AI, I have no opinion.", refusals, None)
    assert verdict.outcome == "rejected"
    assert verdict.reason is not None
    assert "as an AI" in verdict.reason


def test_judge_invalid_json(refusals: RefusalDetector) -> None:
    verdict = judge("sure thing", refusals, validator_for(SCHEMA))
    assert verdict.outcome == "invalid"
    assert verdict.content is None
    assert verdict.reason is not None
    assert verdict.reason.startswith("JSONDecodeError")


def test_judge_schema_violation_names_the_path(refusals: RefusalDetector) -> None:
    verdict = judge('{"action": "go", "steps": [1, "two"]}', refusals, validator_for(SCHEMA))
    assert verdict.outcome == "invalid"
    assert verdict.content is None
    assert verdict.reason is not None
    assert "SchemaValidationError" in verdict.reason
    assert "steps/1" in verdict.reason


def test_judge_schema_violation_at_root(refusals: RefusalDetector) -> None:
    verdict = judge('{"action": "go"}', refusals, validator_for(SCHEMA))
    assert verdict.outcome == "invalid"
    assert verdict.reason is not None
    assert "(root)" in verdict.reason
    assert "steps" in verdict.reason


def test_judge_success_returns_parsed_content(refusals: RefusalDetector) -> None:
    text = 'Answer:\n```json\n{"action": "go", "steps": [1, 2]}\n```'
    verdict = judge(text, refusals, validator_for(SCHEMA))
    assert verdict.outcome == "success"
    assert verdict.reason is None
    assert verdict.content == {"action": "go", "steps": [1, 2]}


def test_judge_without_schema_returns_text(refusals: RefusalDetector) -> None:
    verdict = judge("Paris.", refusals, None)
    assert verdict.outcome == "success"
    assert verdict.content == "Paris."
    assert verdict.reason is None


def test_refusal_with_a_typographic_apostrophe_is_detected() -> None:
    detector = RefusalDetector(DEFAULT_REFUSAL_PATTERNS)
    assert detector.find("Sorry, I can\u2019t do that.") == "I can't"
    assert detector.find("I don\u2018t know") == "I don't know"
    assert detector.find("I can do that.") is None


# --- how the answer ended: cut off, refused by the provider ----------------------------------

CUT = Finish(reason="length", provider_reason="max_tokens", limit="max_tokens (4,096)")
REFUSED = Finish(
    reason="content_filter",
    provider_reason="refusal",
    refusal_category="cyber",
    refusal_explanation="The request could enable cyber harm.",
)


def test_a_cut_off_text_answer_is_rejected_naming_the_limit(refusals: RefusalDetector) -> None:
    verdict = judge("The answer begins well and then", refusals, None, finish=CUT)
    assert (verdict.outcome, verdict.reason) == (
        "rejected",
        "Truncated: the answer was cut off at max_tokens (4,096)",
    )
    assert judge("The answer begins well and then", refusals, None).outcome == "success"


@pytest.mark.parametrize(
    ("text", "outcome"),
    [
        ('{"action": "wait", "steps": [1, 2]}', "success"),  # whole before the cut
        ('```json\n{"action": "wait", "steps": []}\n```\nAnd then I', "success"),
        ('{"action": "wait", "steps": [1, 2', "rejected"),  # cut inside the JSON
        ('{"action": "wait"}', "rejected"),  # whole, but does not fit the schema
    ],
)
def test_a_cut_off_json_answer_passes_only_when_whole_and_fitting(
    refusals: RefusalDetector, text: str, outcome: str
) -> None:
    verdict = judge(text, refusals, validator_for(SCHEMA), finish=CUT)
    assert verdict.outcome == outcome
    if outcome == "rejected":
        assert verdict.reason is not None
        assert verdict.reason.startswith("Truncated: ")


def test_a_cut_off_number_never_passes(refusals: RefusalDetector) -> None:
    """``12`` may be what is left of ``1234``: only closed JSON shows where it ended."""
    number = validator_for({"type": "integer"})
    assert judge("12", refusals, number).outcome == "success"
    assert judge("12", refusals, number, finish=CUT).outcome == "rejected"


def test_a_provider_refusal_is_rejected_with_its_category(refusals: RefusalDetector) -> None:
    verdict = judge("Hello..", refusals, None, finish=REFUSED)
    assert (verdict.outcome, verdict.reason) == (
        "rejected",
        "ProviderRefusal: cyber: The request could enable cyber harm.",
    )
    bare = judge("", refusals, None, finish=Finish(reason="content_filter"))
    assert bare.reason == "ProviderRefusal: the provider stopped the answer (content_filter)"
    # JSON that fits is still refused: the provider said it stopped.
    fitting = '{"action": "x", "steps": []}'
    assert judge(fitting, refusals, validator_for(SCHEMA), finish=REFUSED).outcome == "rejected"


def test_the_providers_own_word_wins_over_litellms() -> None:
    """litellm's JSON mode reports Anthropic's cut-off answers as ``stop``."""
    hidden = Finish(reason="stop", provider_reason="max_tokens", limit="max_tokens (10)")
    assert hidden.truncated
    assert hidden.word == "length"
    window = Finish(reason="length", provider_reason="model_context_window_exceeded")
    assert window.truncated
    assert Finish(reason="stop", provider_reason="end_turn").word == "stop"
    assert Finish(reason="stop", provider_reason="refusal").word == "content_filter"


def test_an_empty_cut_off_answer_says_it_was_cut(refusals: RefusalDetector) -> None:
    assert judge("", refusals, None, finish=CUT).reason == (
        "Truncated: the answer was cut off at max_tokens (4,096)"
    )
    assert judge("", refusals, None).reason == "EmptyResponse: the model returned no text"
