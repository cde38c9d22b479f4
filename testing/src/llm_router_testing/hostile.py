"""A catalogue of hostile requests, as data: what each one is and what it must get.

Request-side entries must come back as ``invalid_request`` (``refused`` is a part
of the error) before any model is called, and the client must refuse them before
enqueueing. Answer-side entries have a valid schema and a model that answers
``answer`` (through the stub's ``echo``, or a stub behaviour that makes answers
too large to put in a prompt): every attempt must be ``invalid`` with a reason
that starts with ``invalid``, and the chain must move on.

Used by the unit tests (the checks alone), the integration test (a real worker)
and ``bench/hostile.py`` (the event-loop lag beside them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

#: Stands in for the URL of a server the schema would make the worker fetch (the
#: integration test points it at a server of its own that counts the requests).
REMOTE = "http://127.0.0.1:9/schema.json"
CATASTROPHIC = "^(a+)+$"


def nested(levels: int, leaf: Any = None) -> Any:
    value = leaf
    for _ in range(levels):
        value = [value]
    return value


def nested_objects(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def _exponential_any_of(levels: int, width: int) -> dict[str, Any]:
    defs: dict[str, Any] = {f"d{levels}": {"type": "string"}}
    for i in range(levels):
        defs[f"d{i}"] = {"anyOf": [{"$ref": f"#/$defs/d{i + 1}"} for _ in range(width)]}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


def _object_with(key: str, value: Any) -> str:
    return json.dumps({key: value})


@dataclass(frozen=True, repr=False)
class Hostile:
    name: str
    schema: Any = None
    #: Extra request fields (``metadata``), as a Python value for the client.
    request: dict[str, Any] = field(default_factory=dict)
    #: The request's JSON text as a hostile producer writes it, when Python's encoder
    #: cannot write it (too deep, NaN, a 5,000-digit number); else json.dumps of the rest.
    wire: str | None = None
    #: Answer side: the model's answer (echoed by the stub), or a stub behaviour.
    answer: str | None = None
    behaviour: str = "echo"
    refused: str | None = None
    invalid: str | None = None
    #: The client refuses it too (it cannot check the worker's size limits).
    client_refuses: bool = True
    #: The worker refuses the job blob as it reads it, before the route function runs.
    at_read: bool = False

    def __repr__(self) -> str:  # the values can be megabytes, or too deep for repr
        return f"Hostile({self.name!r})"

    __str__ = __repr__

    @property
    def request_side(self) -> bool:
        return self.refused is not None

    def prompt(self, marker: str) -> str:
        if self.request_side:
            return f"hostile request {self.name} {marker}"
        return f"stub:*={self.behaviour} {marker}\n{self.answer or ''}"

    def payload(self, marker: str, remote: str = REMOTE) -> dict[str, Any]:
        payload: dict[str, Any] = {"messages": [{"role": "user", "content": self.prompt(marker)}]}
        if self.schema is not None:
            payload["schema"] = {"$ref": remote} if self.schema == {"$ref": REMOTE} else self.schema
        return {**payload, **self.request}

    def wire_text(self, marker: str, remote: str = REMOTE) -> str:
        """The request as JSON text, as a hostile producer writes it into the queue."""
        if self.wire is not None:
            return self.wire.replace("{marker}", marker)
        return json.dumps(self.payload(marker, remote))


_OBJECT_S = {"type": "object", "properties": {"s": {"type": "string", "pattern": CATASTROPHIC}}}
_RE2_REFUSES = "not supported by the linear-time regex engine (RE2)"
_LOOPS = "refers to itself without going into the answer"
_OUTSIDE = "does not resolve inside the schema"
_MESSAGE = '{"role":"user","content":"hostile request {marker}"}'

CATALOGUE: tuple[Hostile, ...] = (
    # -- request side: refused before anything is enqueued or any model is called ----------
    Hostile("backreference", {"type": "string", "pattern": "(a)\\1"}, refused=_RE2_REFUSES),
    Hostile("lookahead key", {"patternProperties": {"^(?!x)": {}}}, refused=_RE2_REFUSES),
    Hostile("lookbehind", {"type": "string", "pattern": "(?<=a)b"}, refused=_RE2_REFUSES),
    Hostile("huge repetition", {"pattern": "((a{100}){100}){100}"}, refused=_RE2_REFUSES),
    Hostile("ref to itself", {"$ref": "#"}, refused=_LOOPS),
    Hostile(
        "refs in a loop",
        {
            "$defs": {"a": {"allOf": [{"$ref": "#/$defs/b"}]}, "b": {"not": {"$ref": "#/$defs/a"}}},
            "$ref": "#/$defs/a",
        },
        refused=_LOOPS,
    ),
    Hostile("dynamic ref loop", {"$dynamicAnchor": "m", "$dynamicRef": "#m"}, refused=_LOOPS),
    Hostile("ref to a URL", {"$ref": REMOTE}, refused=_OUTSIDE),
    Hostile("ref to a file", {"$ref": "file:///etc/passwd"}, refused=_OUTSIDE),
    Hostile("ref to nowhere", {"$ref": "#/$defs/missing"}, refused=_OUTSIDE),
    Hostile(
        "ref to a non-schema",
        {"properties": {"a": {"enum": [1, 2]}}, "$ref": "#/properties/a/enum"},
        refused="not a schema",
    ),
    Hostile(
        "long ref chain",
        {
            "$defs": {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(100)} | {"d100": {}},
            "$ref": "#/$defs/d0",
        },
        refused="in a chain at one place",
    ),
    Hostile("schema 200 deep", nested_objects(100), refused="levels deep"),
    Hostile(
        "request 3000 deep",
        nested(3000, {}),
        wire='{"messages":[' + _MESSAGE + '],"schema":' + "[" * 3000 + "]" * 3000 + "}",
        refused="nested",
        at_read=True,
    ),
    Hostile(
        "draft 3",
        {"$schema": "http://json-schema.org/draft-03/schema#", "type": "string"},
        refused="unsupported $schema",
    ),
    Hostile(
        "schema over max_schema_bytes",
        {"type": "object", "properties": {f"p{n:05}": {"type": "string"} for n in range(3000)}},
        refused="max_schema_bytes",
        client_refuses=False,
    ),
    Hostile("lone surrogate", request={"metadata": {"row": "\ud800"}}, refused="surrogate"),
    Hostile(
        "NaN in metadata",
        request={"metadata": {"score": float("nan")}},
        refused="NaN",
        at_read=True,
    ),
    Hostile(
        "5000-digit number",
        request={"metadata": {"n": 10**4999}},
        wire='{"messages":[' + _MESSAGE + '],"metadata":{"n":' + "9" * 5000 + "}}",
        refused="digits",
        at_read=True,
    ),
    Hostile("metadata 150 deep", request={"metadata": nested(150, 1)}, refused="levels deep"),
    # -- answer side: each model's answer is `invalid`, with a reason -------------------------
    Hostile(
        "catastrophic pattern",
        _OBJECT_S,
        answer=_object_with("s", "a" * 34 + "!"),
        invalid="SchemaValidationError",
    ),
    Hostile(
        "catastrophic pattern, long",
        _OBJECT_S,
        answer=_object_with("s", "a" * 100_000 + "!"),
        invalid="SchemaValidationError",
    ),
    Hostile(
        "nested quantifiers",
        {"type": "string", "pattern": "^(\\w+\\s?)*$"},
        answer=json.dumps("an innocent looking sentence that ends badly" * 20 + "!"),
        invalid="SchemaValidationError",
    ),
    Hostile(
        "catastrophic key, additionalProperties",
        {"patternProperties": {CATASTROPHIC: {}}, "additionalProperties": False},
        answer=_object_with("a" * 40 + "!", 1),
        invalid="SchemaValidationError",
    ),
    Hostile(
        "catastrophic key, unevaluatedProperties",
        {"patternProperties": {CATASTROPHIC: {}}, "unevaluatedProperties": False},
        answer=_object_with("a" * 40 + "!", 1),
        invalid="SchemaValidationError",
    ),
    Hostile(
        "format regex with a backreference",
        {"type": "string", "format": "regex"},
        answer=json.dumps("(a)\\1"),
        invalid="SchemaValidationError",
    ),
    Hostile(
        "answer 100000 deep", {"type": "array"}, behaviour="deep_json", invalid="AnswerTooDeep"
    ),
    Hostile(
        "answer 500 deep",
        {"type": "array"},
        answer=json.dumps(nested(500, 1)),
        invalid="AnswerNotAcceptable",
    ),
    Hostile("answer of 2 MB", {"type": "string"}, behaviour="huge_json", invalid="AnswerTooLarge"),
    Hostile(
        "uniqueItems on 20000 objects",
        {"type": "array", "uniqueItems": True},
        answer=json.dumps([{"i": i, "tags": [i]} for i in range(20_000)] + [{"tags": [0], "i": 0}]),
        invalid="SchemaValidationError",
    ),
    Hostile(
        "enum of 3000 on 20000 items",
        {"type": "array", "items": {"enum": [f"value {i}" for i in range(3000)]}},
        answer=json.dumps(["value 2999"] * 20_000),
        invalid="ValidationTooCostly",
    ),
    Hostile(
        "exponential anyOf through refs",
        _exponential_any_of(levels=10, width=8),
        answer="5",
        invalid="ValidationTooCostly",
    ),
    Hostile("NaN answer", {"type": "object"}, answer='{"score": NaN}', invalid="JSONDecodeError"),
    Hostile(
        "5000-digit answer",
        {"type": "object"},
        answer='{"n": ' + "9" * 5000 + "}",
        invalid="JSONDecodeError",
    ),
    Hostile(
        "lone surrogate answer",
        {"type": "object"},
        answer='{"row": "\\ud800"}',
        invalid="AnswerNotAcceptable",
    ),
)

REQUEST_SIDE = tuple(h for h in CATALOGUE if h.request_side)
ANSWER_SIDE = tuple(h for h in CATALOGUE if not h.request_side)
