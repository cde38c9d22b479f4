"""Hypothesis throws generated schemas and answers at the checks.

Whatever comes in, a schema is either compiled or refused with InvalidSchemaError,
and an answer always gets a verdict, within a bound on the time it takes.
"""

from __future__ import annotations

import json
import time
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from jsonschema.protocols import Validator

from llm_router.client.schemas import InvalidSchemaError, compile_schema
from llm_router.worker.checks import AnswerLimits, RefusalDetector, judge
from llm_router.worker.settings import DEFAULT_REFUSAL_PATTERNS, Settings
from llm_router_testing.hostile import CATASTROPHIC
from tests import schema_strategies

#: The budget each validation gets here, and the bound on a whole check (parse included).
BUDGET_S = 0.2
BOUND_S = 3.0

PATTERNS = [CATASTROPHIC, "(a|aa)*b", "^(\\w+\\s?)*$", "(x+x+)+y", "a{2,50}$", "\\d+", ".*"]
PATTERNS += ["(a)\\1", "(?=a)", "(?<!a)b", "[", "((a{100}){100}){100}", "\\p{L}+"]
patterns = st.sampled_from(PATTERNS) | st.text(max_size=8)
INSIDE = ["#", "#/$defs/a", "#/$defs/b", "#/properties/a", "#/$defs/missing", "#/enum/0"]
refs = st.sampled_from([*INSIDE, "http://127.0.0.1:9/x", "#anchor", "#/items", "other.json"])
scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
)

leaves = st.booleans() | st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["string", "integer", "number", "array", "object", "null"]),
        "pattern": patterns,
        "format": st.sampled_from(["regex", "date", "email", "uuid", "ipv4", "ipv6", "uri"]),
        "enum": st.lists(scalars, max_size=4),
        "const": scalars,
        "uniqueItems": st.booleans(),
        "minLength": st.integers(0, 4),
        "$ref": refs,
        "$anchor": st.just("anchor"),
        "$dynamicAnchor": st.just("anchor"),
        "$dynamicRef": st.just("#anchor"),
    },
)


schemas = schema_strategies.schemas(leaves, patterns, ["a", "b", "aaaa!", ""], refs=refs)

json_values = st.recursive(
    scalars | st.sampled_from(["a" * 40 + "!", "aaaa", "2024-01-31", "(a)\\1"]),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=20,
)
answers = st.one_of(
    json_values.map(json.dumps),
    st.text(max_size=50),
    st.integers(0, 3000).map(lambda n: "[" * n + "]" * n),
    st.integers(0, 200_000).map(lambda n: json.dumps({"a": "a" * n + "!"})),
    st.integers(0, 5000).map(lambda n: json.dumps([{"i": i % 7} for i in range(n)])),
    st.sampled_from(['{"a": NaN}', '{"a": "\\ud800"}', "```json\n{}\n```", "9" * 5000]),
)

refusals = RefusalDetector(DEFAULT_REFUSAL_PATTERNS)
LIMITS = Settings().schema_limits


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(schema=schemas, answer=answers)
def test_the_checks_always_give_a_verdict_in_bounded_time(
    schema: dict[str, Any], answer: str
) -> None:
    started = time.process_time()
    try:
        validator: Validator | None = compile_schema(schema, LIMITS).validator
    except InvalidSchemaError as exc:  # refused: then the answer is judged as text
        refusal = str(exc)
        validator = None
    else:
        refusal = "compiled"
    assert refusal
    verdict = judge(answer, refusals, validator, AnswerLimits(max_seconds=BUDGET_S))
    event(f"schema {'compiled' if validator else 'refused'}, answer {verdict.outcome}")
    assert verdict.outcome in {"success", "rejected", "invalid"}
    if verdict.outcome != "success":
        assert verdict.reason
    elif validator is not None:
        json.dumps(verdict.content)  # what passed can be written into a result
    assert time.process_time() - started < BOUND_S
