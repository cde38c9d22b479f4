"""Hypothesis strategies for JSON Schemas: the keywords that apply subschemas, over leaves."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st


def schemas(
    leaves: st.SearchStrategy[Any],
    patterns: st.SearchStrategy[str],
    names: list[str],
    *,
    refs: st.SearchStrategy[str] | None = None,
    max_leaves: int = 12,
) -> st.SearchStrategy[dict[str, Any]]:
    """Objects built from every applicator keyword, with ``$defs`` and ``$ref`` when
    ``refs`` is given (pointers, anchors, URLs: whatever the caller wants tried)."""
    keys = st.sampled_from(names)

    def containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        optional: dict[str, st.SearchStrategy[Any]] = {
            "properties": st.dictionaries(keys, inner, max_size=3),
            "patternProperties": st.dictionaries(patterns, inner, max_size=2),
            "additionalProperties": inner,
            "unevaluatedProperties": inner,
            "items": inner,
            "prefixItems": st.lists(inner, max_size=2),
            "contains": inner,
            "anyOf": st.lists(inner, min_size=1, max_size=3),
            "oneOf": st.lists(inner, min_size=1, max_size=3),
            "allOf": st.lists(inner, min_size=1, max_size=2),
            "not": inner,
            "if": inner,
            "then": inner,
            "else": inner,
            "dependentSchemas": st.dictionaries(keys, inner, max_size=1),
        }
        if refs is not None:
            optional["$defs"] = st.fixed_dictionaries({}, optional={"a": inner, "b": inner})
            optional["$ref"] = refs
        return st.fixed_dictionaries({}, optional=optional)

    tree = st.recursive(leaves, containers, max_leaves=max_leaves)
    return tree.filter(lambda s: isinstance(s, dict))
