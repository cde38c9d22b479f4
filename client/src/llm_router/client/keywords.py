"""jsonschema keywords that a hostile schema or answer cannot make run for ever.

The caller writes the schema and, through the prompt, steers the answer, so both
are hostile input. jsonschema evaluates ``pattern`` (and ``patternProperties``,
``additionalProperties``, ``unevaluatedProperties``, ``format: regex``) with
Python's backtracking ``re``: ``^(a+)+$`` against 34 ``a`` and a ``!`` spins for
minutes. Here those keywords use RE2, which runs in time linear in the text;
``uniqueItems`` hashes (jsonschema compares every pair of objects: quadratic);
``anyOf`` and ``oneOf`` stop at a branch's first error (jsonschema keeps them all).

Every keyword evaluation also looks at a CPU-time :class:`Budget` when one is set
(the worker sets one per answer, see :func:`metered_budget`), so validating one
answer costs at most that much CPU whatever the schema does.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import reprlib
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from datetime import date
from typing import Any

import re2
from jsonschema import Draft201909Validator, FormatChecker, ValidationError
from jsonschema.protocols import Validator
from jsonschema.validators import extend

# Longest string a format check looks at: longer is not a date, an address or a uuid.
_FORMAT_TEXT_MAX = 1024

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # RE2 would print every refused pattern to stderr
# Program and match-time cache of one pattern; a pattern needing more is refused.
_OPTIONS.max_mem = 1 << 20


class PatternError(ValueError):
    """A pattern RE2 cannot compile: backreferences, lookaround, oversized repetitions."""


def compile_pattern(pattern: str) -> Any:
    """The RE2 program for a pattern; :class:`PatternError` if it has none."""
    try:
        return re2.compile(pattern, _OPTIONS)
    except re2.error as exc:
        detail = exc.args[0] if exc.args else exc
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "replace")
        raise PatternError(str(detail)) from None
    except UnicodeEncodeError:
        raise PatternError("the pattern is not valid UTF-8 (a lone surrogate)") from None


#: A schema's patterns, compiled once (answers' ``format: regex`` strings are not kept).
schema_pattern = functools.lru_cache(maxsize=1024)(compile_pattern)


def search(pattern: str, text: str) -> bool:
    tick(1 + len(text) // 4096)
    return schema_pattern(pattern).search(text) is not None


# -- the budget ------------------------------------------------------------------------------


class BudgetExceeded(Exception):
    """Validation of one answer used more CPU time than its budget allows."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"validation stopped after {seconds:g} s of CPU")
        self.seconds = seconds


# Reading the thread's CPU clock costs about 0.6 µs: look at it every this many ticks.
_TICKS_PER_LOOK = 16


class Budget:
    """CPU time left for one validation, on the clock of the thread that runs it (time
    spent waiting for the GIL does not count). Every keyword ticks; big ones tick more.

    With ``share_gil`` (a validation in a thread beside an event loop) each look at the
    clock also offers the GIL to a waiting thread, so the loop gets it within tens of
    microseconds rather than at the interpreter's 5 ms switch interval.
    """

    __slots__ = ("countdown", "deadline", "seconds", "share_gil", "started")

    def __init__(self, seconds: float, share_gil: bool = False) -> None:
        self.seconds = seconds
        self.share_gil = share_gil
        self.started = time.thread_time()
        self.deadline = self.started + seconds
        self.countdown = _TICKS_PER_LOOK

    def tick(self, ticks: int = 1) -> None:
        self.countdown -= ticks
        if self.countdown <= 0:
            self.countdown = _TICKS_PER_LOOK
            if time.thread_time() > self.deadline:
                raise BudgetExceeded(self.seconds)
            if self.share_gil:
                time.sleep(0)

    @property
    def used(self) -> float:
        return time.thread_time() - self.started


_BUDGET: ContextVar[Budget | None] = ContextVar("llm_router_validation_budget", default=None)


def tick(ticks: int = 1) -> None:
    """Count work against the current validation's budget, if it has one."""
    budget = _BUDGET.get()
    if budget is not None:
        budget.tick(ticks)


@contextlib.contextmanager
def metered_budget(seconds: float, share_gil: bool = False) -> Iterator[Budget]:
    """Validation inside this block stops with :class:`BudgetExceeded` after ``seconds``."""
    budget = Budget(seconds, share_gil)
    token = _BUDGET.set(budget)
    try:
        yield budget
    finally:
        _BUDGET.reset(token)


KeywordFn = Callable[[Any, Any, Any, Any], Any]


def _metered(fn: KeywordFn) -> KeywordFn:
    # Returns fn's own generator: no extra frame per keyword, so no less recursion headroom.
    def keyword(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
        budget = _BUDGET.get()
        if budget is not None:  # an enum of 3,000 compares 3,000 times: it ticks more
            budget.tick(1 + len(value) // 32 if isinstance(value, list | dict) else 1)
        return fn(validator, value, instance, schema)

    return keyword


# -- keywords in linear time ------------------------------------------------------------------


def pattern(validator: Any, patrn: str, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not search(patrn, instance):
        yield ValidationError(f"{_brief(instance)} does not match {patrn!r}")


def pattern_properties(
    validator: Any, patterns: Mapping[str, Any], instance: Any, schema: Any
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for patrn, subschema in patterns.items():
        for key, value in instance.items():
            if search(patrn, key):
                yield from validator.descend(value, subschema, path=key, schema_path=patrn)


def _matches_any(key: str, patterns: Iterable[str]) -> bool:
    return any(search(p, key) for p in patterns)


def additional_properties(
    validator: Any, extra: Any, instance: Any, schema: Any
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    properties = schema.get("properties", {})
    patterns = list(schema.get("patternProperties", {}))
    extras = [k for k in instance if k not in properties and not _matches_any(k, patterns)]
    if validator.is_type(extra, "object"):
        for key in extras:
            yield from validator.descend(instance[key], extra, path=key)
    elif not extra and extras:
        if patterns:
            verb = "does" if len(extras) == 1 else "do"
            joined = ", ".join(repr(each) for each in sorted(extras))
            listed = ", ".join(repr(each) for each in sorted(patterns))
            yield ValidationError(f"{joined} {verb} not match any of the regexes: {listed}")
        else:
            error = "Additional properties are not allowed (%s %s unexpected)"
            yield ValidationError(error % _extras(sorted(extras, key=str)))


def _is_valid(errors: Iterator[ValidationError]) -> bool:
    return next(errors, None) is None


def _evolved(validator: Any, resolved: Any) -> Any:
    return validator.evolve(schema=resolved.contents, _resolver=resolved.resolver)


def evaluated_keys(validator: Any, instance: dict[str, Any], schema: Any, legacy: bool) -> set[str]:
    """The keys ``unevaluatedProperties`` must leave alone: jsonschema's own walk
    (``find_evaluated_property_keys_by_schema``; ``legacy``: its draft 2019-09 one), with RE2."""
    if validator.is_type(schema, "boolean"):
        return set()
    keys: set[str] = set()
    refs = [validator._resolver.lookup(schema["$ref"])] if "$ref" in schema else []
    if not legacy and "$dynamicRef" in schema:
        refs.append(validator._resolver.lookup(schema["$dynamicRef"]))
    if legacy and "$recursiveRef" in schema:
        from jsonschema._legacy_keywords import lookup_recursive_ref  # type: ignore[attr-defined]

        refs.append(lookup_recursive_ref(validator._resolver))
    for resolved in refs:
        keys |= evaluated_keys(_evolved(validator, resolved), instance, resolved.contents, legacy)
    if legacy:
        for keyword in ("properties", "additionalProperties", "unevaluatedProperties"):
            value = schema.get(keyword)
            if value is True:
                keys |= instance.keys()
            elif isinstance(value, dict):
                keys |= value.keys() & instance.keys()
    else:
        properties = schema.get("properties")
        if isinstance(properties, dict):
            keys |= properties.keys() & instance.keys()
        for keyword in ("additionalProperties", "unevaluatedProperties"):
            if (subschema := schema.get(keyword)) is not None:
                keys |= {
                    key
                    for key, value in instance.items()
                    if _is_valid(validator.descend(value, subschema))
                }
    patterns = list(schema.get("patternProperties", {}))
    if patterns:
        keys |= {key for key in instance if _matches_any(key, patterns)}
    for key, subschema in schema.get("dependentSchemas", {}).items():
        if key in instance:
            keys |= evaluated_keys(validator, instance, subschema, legacy)
    for keyword in ("allOf", "oneOf", "anyOf"):
        for subschema in schema.get(keyword, []):
            if _is_valid(validator.descend(instance, subschema)):
                keys |= evaluated_keys(validator, instance, subschema, legacy)
    if "if" in schema:
        if validator.evolve(schema=schema["if"]).is_valid(instance):
            keys |= evaluated_keys(validator, instance, schema["if"], legacy)
            if "then" in schema:
                keys |= evaluated_keys(validator, instance, schema["then"], legacy)
        elif "else" in schema:
            keys |= evaluated_keys(validator, instance, schema["else"], legacy)
    return keys


def unevaluated_properties(legacy: bool) -> KeywordFn:
    def keyword(
        validator: Any, unevaluated: Any, instance: Any, schema: Any
    ) -> Iterator[ValidationError]:
        if not validator.is_type(instance, "object"):
            return
        seen = evaluated_keys(validator, instance, schema, legacy)
        failing = [
            key
            for key in instance
            if key not in seen
            and not _is_valid(
                validator.descend(instance[key], unevaluated, path=key, schema_path=key)
            )
        ]
        if failing and unevaluated is False:
            error = "Unevaluated properties are not allowed (%s %s unexpected)"
            yield ValidationError(error % _extras(sorted(failing, key=str)))
        elif failing:
            error = "Unevaluated properties are not valid under the given schema (%s %s invalid)"
            yield ValidationError(error % _extras(failing))

    return keyword


def any_of(
    validator: Any, subschemas: list[Any], instance: Any, schema: Any
) -> Iterator[ValidationError]:
    # jsonschema keeps every error of every branch (as the error's context): a wide,
    # nested anyOf then builds and frees millions of objects. One failure a branch is enough.
    for index, subschema in enumerate(subschemas):
        if _is_valid(validator.descend(instance, subschema, schema_path=index)):
            return
    yield ValidationError(f"{_brief(instance)} is not valid under any of the given schemas")


def one_of(
    validator: Any, subschemas: list[Any], instance: Any, schema: Any
) -> Iterator[ValidationError]:
    valid = []
    for index, subschema in enumerate(subschemas):
        if _is_valid(validator.descend(instance, subschema, schema_path=index)):
            valid.append(subschema)
            if len(valid) > 1:
                listed = ", ".join(_brief(each) for each in valid)
                yield ValidationError(f"{_brief(instance)} is valid under each of {listed}")
                return
    if not valid:
        yield ValidationError(f"{_brief(instance)} is not valid under any of the given schemas")


def _identity(value: Any) -> Any:
    """A hashable stand-in, equal exactly when JSON Schema calls two values equal
    (``1 == 1.0``, ``true != 1``, key order does not matter)."""
    if value is True or value is False:
        return ("bool", value)
    if isinstance(value, dict):
        return ("object", frozenset((k, _identity(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return ("array", tuple(_identity(v) for v in value))
    return (type(value).__name__ if isinstance(value, str) else "value", value)


def unique_items(
    validator: Any, unique: Any, instance: Any, schema: Any
) -> Iterator[ValidationError]:
    if not unique or not validator.is_type(instance, "array"):
        return
    seen: set[Any] = set()
    for index, item in enumerate(instance):
        tick()
        identity = _identity(item)
        if identity in seen:
            yield ValidationError(f"has non-unique elements (item {index} repeats an earlier one)")
            return
        seen.add(identity)


def _extras(keys: list[str]) -> tuple[str, str]:
    return ", ".join(repr(key) for key in keys), "was" if len(keys) == 1 else "were"


_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxstring, _BRIEF.maxother = 3, 60, 60


def _brief(value: Any) -> str:
    """A repr that stays short however large or deep the value."""
    return _BRIEF.repr(value)


# -- formats -------------------------------------------------------------------------------

#: The ``format`` values that are checked; any other format is an annotation only.
#: All are local and linear; none touches the network.
CHECKED_FORMATS = ("date", "email", "idn-email", "ipv4", "ipv6", "regex", "uuid")

FORMAT_CHECKER = FormatChecker(formats=())


@FORMAT_CHECKER.checks("regex", raises=PatternError)
def _is_regex(instance: object) -> bool:
    if isinstance(instance, str):
        tick(1 + len(instance) // 4096)
        compile_pattern(instance)
    return True


@FORMAT_CHECKER.checks("date", raises=ValueError)
def _is_date(instance: object) -> bool:
    if not isinstance(instance, str):
        return True
    if len(instance) != 10 or instance[4] != "-" or instance[7] != "-" or not instance.isascii():
        return False
    return bool(date.fromisoformat(instance))


@FORMAT_CHECKER.checks("email")
@FORMAT_CHECKER.checks("idn-email")
def _is_email(instance: object) -> bool:
    return not isinstance(instance, str) or "@" in instance


@FORMAT_CHECKER.checks("ipv4", raises=ValueError)
def _is_ipv4(instance: object) -> bool:
    if not isinstance(instance, str):
        return True
    return len(instance) <= _FORMAT_TEXT_MAX and bool(ipaddress.IPv4Address(instance))


@FORMAT_CHECKER.checks("ipv6", raises=ValueError)
def _is_ipv6(instance: object) -> bool:
    if not isinstance(instance, str):
        return True
    if len(instance) > _FORMAT_TEXT_MAX:
        return False
    address = ipaddress.IPv6Address(instance)
    return not getattr(address, "scope_id", "")


@FORMAT_CHECKER.checks("uuid", raises=ValueError)
def _is_uuid(instance: object) -> bool:
    if not isinstance(instance, str):
        return True
    if len(instance) > _FORMAT_TEXT_MAX:
        return False
    uuid.UUID(instance)  # raises unless 32 hex digits
    return all(instance[i] == "-" for i in (8, 13, 18, 23))


# -- the validator classes -------------------------------------------------------------------


@functools.cache
def safe_validator_class(cls: type[Validator]) -> type[Validator]:
    """``cls`` with the linear-time keywords, every keyword metered, our formats."""
    linear: dict[str, KeywordFn] = {
        "pattern": pattern,
        "patternProperties": pattern_properties,
        "additionalProperties": additional_properties,
        "unevaluatedProperties": unevaluated_properties(cls is Draft201909Validator),
        "uniqueItems": unique_items,
        "anyOf": any_of,
        "oneOf": one_of,
    }
    keywords = {
        name: _metered(linear.get(name, fn) or fn) for name, fn in cls.VALIDATORS.items() if fn
    }
    extended: type[Validator] = extend(  # type: ignore[no-untyped-call]
        cls, validators=keywords, format_checker=FORMAT_CHECKER
    )
    return extended
