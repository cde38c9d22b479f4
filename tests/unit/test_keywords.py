"""The linear-time keywords agree with jsonschema's own wherever both finish.

And the schema checks accept what a legitimate schema does: anchors, nested ``$id``,
trees through ``$ref``, draft 7 ``definitions``.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft7Validator, Draft201909Validator, Draft202012Validator

from llm_router.client.keywords import FORMAT_CHECKER, BudgetExceeded, metered_budget
from llm_router.client.schemas import InvalidSchemaError, compile_schema
from tests import schema_strategies

# Patterns that mean the same to RE2 and to Python's re, and run fast on both.
SAME_PATTERNS = ["^a", "b$", "\\d+", "^[a-c]{2,3}$", "x|y", "^$"]
patterns = st.sampled_from(SAME_PATTERNS)
WORDS = ["a", "ab", "b", "abc", "1", "x", ""]
scalars = st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from([1.0, 2.5, *WORDS])
leaves = st.booleans() | st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["string", "integer", "number", "array", "object", "boolean"]),
        "pattern": patterns,
        "enum": st.lists(scalars, max_size=3),
        "uniqueItems": st.booleans(),
        "minLength": st.integers(0, 2),
    },
)


schemas = schema_strategies.schemas(leaves, patterns, ["a", "ab", "b", "x"], max_leaves=10)
instances = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(["a", "ab", "b", "x", "1", "bb"]), inner, max_size=4)
    ),
    max_leaves=12,
)
DRAFTS = {
    "2020-12": Draft202012Validator,
    "2019-09": Draft201909Validator,
    "7": Draft7Validator,
}


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(schema=schemas, instance=instances, draft=st.sampled_from(sorted(DRAFTS)))
def test_same_verdict_as_jsonschema(schema: dict[str, Any], instance: Any, draft: str) -> None:
    cls = DRAFTS[draft]
    schema = {"$schema": cls.META_SCHEMA["$schema"], **schema}
    try:
        ours = compile_schema(schema).validator
    except InvalidSchemaError:
        return  # e.g. a keyword value the metaschema refuses
    theirs = cls(schema, format_checker=FORMAT_CHECKER)
    assert ours.is_valid(instance) == theirs.is_valid(instance)


@pytest.mark.parametrize(
    ("items", "unique"),
    [
        ([1, 1.0], False),  # equal numbers
        ([True, 1], True),  # a boolean is not a number
        ([False, 0, None], True),
        ([{"a": 1, "b": [2]}, {"b": [2], "a": 1}], False),  # key order does not matter
        ([[1, [2]], [1, [2]]], False),
        ([[1, 2], [2, 1]], True),  # array order does
        (["1", 1], True),
        ([{"a": True}, {"a": 1}], True),
    ],
)
def test_unique_items_means_what_jsonschema_means(items: list[Any], unique: bool) -> None:
    schema = {"type": "array", "uniqueItems": True}
    assert compile_schema(schema).validator.is_valid(items) is unique
    assert Draft202012Validator(schema).is_valid(items) is unique


def test_the_budget_stops_a_validation_and_nothing_else() -> None:
    validator = compile_schema({"type": "array", "items": {"type": "integer"}}).validator
    big = list(range(200_000))
    with pytest.raises(BudgetExceeded, match=r"0\.001 s of CPU"), metered_budget(0.001):
        validator.is_valid(big)
    assert validator.is_valid(big)  # without a budget it runs to the end
    with metered_budget(30, share_gil=True) as budget:
        assert validator.is_valid(big)
    assert 0 < budget.used < 30


@pytest.mark.parametrize(
    "schema",
    [
        {"$defs": {"s": {"$anchor": "s", "type": "string"}}, "$ref": "#s"},
        {
            "$id": "https://example.com/root",
            "$defs": {
                "n": {"$id": "nested", "$defs": {"i": {"type": "integer"}}, "$ref": "#/$defs/i"}
            },
            "$ref": "nested",
        },
        {"type": "object", "properties": {"children": {"type": "array", "items": {"$ref": "#"}}}},
        {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "definitions": {"s": {"type": "string"}},
            "properties": {"a": {"$ref": "#/definitions/s"}},
        },
        {"$dynamicAnchor": "node", "properties": {"kid": {"$dynamicRef": "#node"}}},
        {
            "$ref": "https://example.com/me#/$defs/a",
            "$id": "https://example.com/me",
            "$defs": {"a": {}},
        },
    ],
)
def test_legitimate_references_are_accepted(schema: dict[str, Any]) -> None:
    compiled = compile_schema(schema)
    assert compiled.inlined_nodes < 100


def test_a_reference_bomb_is_counted_as_what_it_inlines_to() -> None:
    defs: dict[str, Any] = {"d5": {"type": "string"}}
    for i in range(5):
        defs[f"d{i}"] = {"anyOf": [{"$ref": f"#/$defs/d{i + 1}"}] * 4}
    compiled = compile_schema({"$defs": defs, "$ref": "#/$defs/d0"})
    assert compiled.inlined_nodes > 4**5
