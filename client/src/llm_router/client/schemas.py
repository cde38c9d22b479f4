"""Caller-supplied JSON Schemas: refused early when they could hurt, compiled once.

A schema is hostile input (see :mod:`~llm_router.client.keywords`). Before one is
used it must be a JSON object of bounded depth and size, of a supported draft,
valid against its metaschema, with every pattern one RE2 can run, and with
every ``$ref`` pointing inside the schema (nothing is ever fetched) along
reference chains that end. Both the client (before enqueueing) and the worker
(before calling a model) run these checks, so a foreign producer's schema is
refused as ``invalid_request`` before any model is called.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import referencing.exceptions
import referencing.jsonschema
from jsonschema import (
    Draft4Validator,
    Draft6Validator,
    Draft7Validator,
    Draft201909Validator,
    Draft202012Validator,
    FormatChecker,
)
from jsonschema.exceptions import SchemaError
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for
from referencing import Registry

from llm_router.client.keywords import (
    FORMAT_CHECKER,
    PatternError,
    safe_validator_class,
    schema_pattern,
)
from llm_router.client.untrusted import problem


@dataclass(frozen=True, slots=True)
class SchemaLimits:
    """How big a schema may be; the worker's settings, the client's ceilings."""

    max_bytes: int = 65_536
    #: Nesting of JSON objects and arrays, and also of in-place reference chains.
    max_depth: int = 32


#: The most a worker may be configured to accept. The client checks against these,
#: so it never refuses what a worker could take; the worker applies its own limits.
CEILING = SchemaLimits(max_bytes=1_000_000, max_depth=64)

SUPPORTED_DRAFTS: tuple[type[Validator], ...] = (
    Draft4Validator,
    Draft6Validator,
    Draft7Validator,
    Draft201909Validator,
    Draft202012Validator,
)


class InvalidSchemaError(ValueError):
    """The caller's JSON Schema is not one the router can use; the message says why."""


@dataclass(frozen=True, slots=True)
class CompiledSchema:
    """A schema that passed every check, and its validator."""

    validator: Validator
    #: Subschemas once every ``$ref`` is inlined (a reference loop is cut where it
    #: closes), as litellm inlines them for some providers: a few kilobytes of
    #: references can stand for gigabytes.
    inlined_nodes: int


def canonical_json(value: Any, default: Callable[[Any], Any] | None = None) -> str:
    """One text per value, so equal schemas share one compiled validator (and equal
    requests one cache key). ``default``: how a value JSON has no form for is written."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=default
    )


def compile_schema(schema: Any, limits: SchemaLimits = CEILING) -> CompiledSchema:
    """The schema's validator, after every check; :class:`InvalidSchemaError` if none.

    Cheap checks (depth, size) run on every call; the rest once per distinct schema.
    """
    if not isinstance(schema, dict):
        raise InvalidSchemaError("schema must be a JSON object")
    if (why := problem(schema, limits.max_depth, "max_schema_depth")) is not None:
        raise InvalidSchemaError(f"the schema {why}")
    text = canonical_json(schema)
    size = len(text.encode())
    if size > limits.max_bytes:
        raise InvalidSchemaError(
            f"the schema is {size} bytes, more than the limit of {limits.max_bytes} "
            "(max_schema_bytes)"
        )
    return _compile(text, limits.max_depth)


@functools.lru_cache(maxsize=256)
def _compile(text: str, max_chain: int) -> CompiledSchema:
    schema = json.loads(text)
    cls = _draft(schema)
    try:
        # Structure only: patterns and references get clearer reasons below.
        cls.check_schema(schema, format_checker=FormatChecker(formats=()))  # type: ignore[call-arg]
    except SchemaError as exc:
        where = _pointer(exc.absolute_path)
        raise InvalidSchemaError(
            f"invalid JSON Schema: {exc.message}" + (f" (at {where})" if where else "")
        ) from None
    except RecursionError:
        raise InvalidSchemaError("the schema is nested too deeply to check") from None
    references = _References(schema, cls)
    try:
        references.check(max_chain)
    except InvalidSchemaError:
        raise
    except Exception as exc:  # a malformed $id, anchor or URI deep in referencing
        raise InvalidSchemaError(f"the schema's references cannot be resolved: {exc}") from None
    safe = safe_validator_class(cls)
    # An empty registry: a $ref is only ever resolved inside the schema, never fetched.
    validator: Validator = safe(schema, registry=Registry(), format_checker=FORMAT_CHECKER)
    return CompiledSchema(validator, references.inlined_nodes())


def _draft(schema: dict[str, Any]) -> type[Validator]:
    if "$schema" not in schema:
        return Draft202012Validator
    dialect = schema["$schema"]
    known = isinstance(dialect, str)
    cls = validator_for(schema, default=None) if known else None  # type: ignore[arg-type]
    if cls not in SUPPORTED_DRAFTS:
        supported = ", ".join(repr(d.META_SCHEMA["$schema"]) for d in SUPPORTED_DRAFTS)
        raise InvalidSchemaError(f"unsupported $schema {dialect!r} (supported: {supported})")
    assert cls is not None
    return cls


def _pointer(path: Any) -> str:
    return "".join(f"/{str(p).replace('~', '~0').replace('/', '~1')}" for p in path)


# Subschemas applied to the same place in the answer, and those applied to a part of it
# (drafts 4 to 2020-12). Only the first kind can form a loop that never ends.
_IN_PLACE_ONE = ("not", "if", "then", "else")
_IN_PLACE_LIST = ("allOf", "anyOf", "oneOf")
_IN_PLACE_MAP = ("dependentSchemas", "dependencies")
_INNER_ONE = (
    "additionalItems",
    "additionalProperties",
    "contains",
    "contentSchema",
    "items",
    "propertyNames",
    "unevaluatedItems",
    "unevaluatedProperties",
)
_INNER_LIST = ("items", "prefixItems")
_INNER_MAP = ("properties", "patternProperties", "$defs", "definitions")
_REFS = ("$ref", "$dynamicRef", "$recursiveRef")


def _subschemas(node: dict[str, Any]) -> Iterator[tuple[str, Any, bool]]:
    """(pointer suffix, subschema, applied in place) for each subschema of ``node``."""
    for keyword in (*_IN_PLACE_ONE, *_INNER_ONE):
        value = node.get(keyword)
        if isinstance(value, dict | bool):
            yield f"/{keyword}", value, keyword in _IN_PLACE_ONE
    for keyword in (*_IN_PLACE_LIST, *_INNER_LIST):
        value = node.get(keyword)
        if isinstance(value, list):
            for i, item in enumerate(value):
                yield f"/{keyword}/{i}", item, keyword in _IN_PLACE_LIST
    for keyword in (*_IN_PLACE_MAP, *_INNER_MAP):
        value = node.get(keyword)
        if isinstance(value, dict):
            for name, item in value.items():
                if isinstance(item, dict | bool):
                    yield f"/{keyword}{_pointer([name])}", item, keyword in _IN_PLACE_MAP


class _References:
    """One walk over the schema: patterns, where each reference leads, and the graph of
    subschemas applied in place, which must have no cycle and no chain too long."""

    def __init__(self, schema: dict[str, Any], cls: type[Validator]) -> None:
        dialect = cls.META_SCHEMA.get("$schema", "")
        self.spec = referencing.jsonschema.specification_with(
            dialect, default=referencing.jsonschema.DRAFT202012
        )
        self.schema = schema
        root = self.spec.create_resource(schema)
        registry: Registry[Any] = Registry().with_resource(root.id() or "", root)
        self.resolver = registry.crawl().resolver(base_uri=root.id() or "")
        self.where: dict[int, str] = {}
        self.in_place: dict[int, list[int]] = {}
        self.inner: dict[int, list[int]] = {}  # subschemas and reference targets
        self.dynamic_anchors: dict[str, list[int]] = {}
        self.dynamic_refs: list[tuple[int, str]] = []
        self.recursive_anchors: list[int] = [id(schema)]
        self.recursive_refs: list[int] = []

    def check(self, max_chain: int) -> None:
        self._walk()
        for node, name in self.dynamic_refs:
            self.in_place[node] += self.dynamic_anchors.get(name, [])
        for node in self.recursive_refs:
            self.in_place[node] += self.recursive_anchors
        self._check_graph(max_chain)

    def _walk(self) -> None:
        stack: list[tuple[Any, Any, str]] = [(self.schema, self.resolver, "#")]
        while stack:
            node, resolver, where = stack.pop()
            if not isinstance(node, dict) or id(node) in self.where:
                continue
            self.where[id(node)] = where
            edges = self.in_place.setdefault(id(node), [])
            inner = self.inner.setdefault(id(node), [])
            if node is not self.schema and self.spec.id_of(node) is not None:
                resolver = resolver.in_subresource(self.spec.create_resource(node))
            self._patterns(node, where)
            if isinstance(anchor := node.get("$dynamicAnchor"), str):
                self.dynamic_anchors.setdefault(anchor, []).append(id(node))
            if node.get("$recursiveAnchor") is True:
                self.recursive_anchors.append(id(node))
            for keyword in _REFS:
                if keyword not in node:
                    continue
                target, target_resolver = self._resolve(node[keyword], keyword, resolver, where)
                if isinstance(target, dict):
                    edges.append(id(target))
                    inner.append(id(target))
                    stack.append((target, target_resolver, str(node[keyword])))
                if keyword == "$dynamicRef":
                    self.dynamic_refs.append((id(node), str(node[keyword]).partition("#")[2]))
                if keyword == "$recursiveRef":
                    self.recursive_refs.append(id(node))
            for suffix, sub, in_place in _subschemas(node):
                if isinstance(sub, dict):
                    inner.append(id(sub))
                    if in_place:
                        edges.append(id(sub))
                stack.append((sub, resolver, where + suffix))

    def _resolve(self, ref: Any, keyword: str, resolver: Any, where: str) -> tuple[Any, Any]:
        at = f"{keyword} at {where}"
        if not isinstance(ref, str):
            raise InvalidSchemaError(f"{at} must be a string")
        try:
            resolved = resolver.lookup(ref)
        except referencing.exceptions.Unresolvable:
            raise InvalidSchemaError(
                f"{at}: {ref!r} does not resolve inside the schema "
                "(references to other documents or URLs are not followed)"
            ) from None
        if not isinstance(resolved.contents, dict | bool):
            raise InvalidSchemaError(f"{at}: {ref!r} points at a value that is not a schema")
        return resolved.contents, resolved.resolver

    @staticmethod
    def _patterns(node: dict[str, Any], where: str) -> None:
        found = []
        if isinstance(node.get("pattern"), str):
            found.append((node["pattern"], f"{where}/pattern"))
        if isinstance(node.get("patternProperties"), dict):
            found += [(p, f"{where}/patternProperties") for p in node["patternProperties"]]
        for pattern, at in found:
            try:
                schema_pattern(pattern)
            except PatternError as exc:
                raise InvalidSchemaError(
                    f"pattern {pattern!r} at {at} is not supported by the linear-time "
                    f"regex engine (RE2): {exc}"
                ) from None

    def _check_graph(self, max_chain: int) -> None:
        """Depth-first, without recursion: a cycle is refused, then the longest chain."""
        longest: dict[int, int] = {}
        on_path: dict[int, int] = {}  # node -> index in path
        path: list[int] = []
        for start in self.in_place:
            if start in longest:
                continue
            stack: list[tuple[int, Iterator[int]]] = [(start, iter(self.in_place[start]))]
            on_path[start], path[:] = 0, [start]
            while stack:
                node, children = stack[-1]
                child = next(children, None)
                if child is None:
                    stack.pop()
                    path.pop()
                    del on_path[node]
                    longest[node] = 1 + max((longest[c] for c in self.in_place[node]), default=0)
                    if longest[node] > max_chain:
                        raise InvalidSchemaError(
                            f"the schema applies {longest[node]} subschemas in a chain at one "
                            f"place (from {self.where[node]}), more than {max_chain} "
                            "(max_schema_depth)"
                        )
                elif child in on_path:
                    loop = [self.where[n] for n in path[on_path[child] :]] + [self.where[child]]
                    raise InvalidSchemaError(
                        "the schema refers to itself without going into the answer, so "
                        f"checking it would never end: {' -> '.join(loop)}"
                    )
                elif child not in longest:
                    on_path[child] = len(path)
                    path.append(child)
                    stack.append((child, iter(self.in_place[child])))

    def inlined_nodes(self) -> int:
        """Post-order over subschemas and reference targets; a node already on the
        path (a loop) counts nothing, as litellm leaves such a reference in place."""
        size: dict[int, int] = {}
        on_path: set[int] = set()
        root = id(self.schema)
        stack: list[tuple[int, Iterator[int]]] = [(root, iter(self.inner[root]))]
        on_path.add(root)
        total: dict[int, int] = {root: 1}
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                on_path.discard(node)
                size[node] = total.pop(node)
                if stack:
                    total[stack[-1][0]] += size[node]
            elif child in size:
                total[node] += size[child]
            elif child not in on_path:
                on_path.add(child)
                total[child] = 1
                stack.append((child, iter(self.inner[child])))
        return size[root]
