"""The worker's settings documented from the one place they are defined.

:class:`~llm_router.worker.settings.Settings` and
:class:`~llm_router.worker.settings.ModelConfig` hold every setting and model field: its
name, type, limits, default and, in the field's ``description``, what it means. From
them this module renders

* the tables of ``docs/configuration.md``, each between a pair of marker comments
  (``<!-- settings:begin -->`` … ``<!-- settings:end -->``, likewise ``model-fields`` and
  ``default-chains``), so the prose around them is kept as written;
* a check of ``deploy/worker.toml``: every setting appears in it, as a key or as a
  commented key (``# name = value``); every model field appears in a chain, as a commented
  key, or in the comment block that follows ``# Fields of one model:``; the file is valid
  settings; and a value the file sets agrees with the built-in default unless the comment
  right above it says ``not the default`` (a table setting such as ``chains`` is compared
  entry by entry: the file's ``default`` chain must be the built-in one, other chains are
  additions).

``python -m llm_router_testing.configdoc`` writes the tables again after a setting changed
and reports what ``worker.toml`` lacks (exit 1 if anything); ``--check`` writes nothing
and exits 1 when the tables are stale or ``worker.toml`` has a problem.
``tests/unit/test_config_docs.py`` fails in the same cases.
"""

from __future__ import annotations

import json
import re
import sys
import tomllib
import types
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic import BaseModel, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from llm_router.worker.settings import ENV_PREFIX, ModelConfig, Settings, default_chains

ROOT = Path(__file__).resolve().parents[3]
CONFIG_DOC = ROOT / "docs" / "configuration.md"
WORKER_TOML = ROOT / "deploy" / "worker.toml"

#: The comment line in worker.toml that opens the list of model fields.
MODEL_FIELDS_HEADING = re.compile(r"^#\s*Fields of one model:", re.MULTILINE)
#: In the comment right above a key: the value there is deliberately not the default.
NOT_DEFAULT = "not the default"
DASH = "\u2013"


class _Required:
    def __repr__(self) -> str:
        return "required"


REQUIRED: Any = _Required()


# --- one field, in words -------------------------------------------------------------


def env_name(name: str) -> str:
    """The environment variable of setting ``name``."""
    return ENV_PREFIX + name.upper()


def default_of(field: FieldInfo) -> Any:
    """The field's default (a default factory called), or :data:`REQUIRED`."""
    if field.default is PydanticUndefined and field.default_factory is None:
        return REQUIRED
    return field.get_default(call_default_factory=True)


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


def _type_words(annotation: Any) -> str:
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin is Literal:
        choices = [f"`{a}`" for a in args]
        return ", ".join(choices[:-1]) + " or " + choices[-1] if len(choices) > 1 else choices[0]
    if origin in (Union, types.UnionType):
        return " or ".join(_type_words(a) for a in args if a is not type(None))
    if origin is dict:
        return f"table (name → {_type_words(args[1])})" if args and args[1] is not Any else "table"
    if origin is list:
        return f"list of {_type_words(args[0])}s" if args else "list"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "model"
    words = {bool: "boolean", int: "integer", float: "number", str: "string", SecretStr: "string"}
    return words.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _limits(field: FieldInfo) -> str:
    low = high = ""
    parts: list[str] = []
    for item in field.metadata:
        if isinstance(item, Ge):
            low = f"≥ {_number(item.ge)}"
        elif isinstance(item, Gt):
            low = f"> {_number(item.gt)}"
        elif isinstance(item, Le):
            high = f"≤ {_number(item.le)}"
        elif isinstance(item, Lt):
            high = f"< {_number(item.lt)}"
        elif isinstance(item, MinLen) and item.min_length == 1:
            parts.append("not empty")
        elif isinstance(item, MinLen):
            parts.append(f"at least {item.min_length} long")
        elif isinstance(item, MaxLen):
            parts.append(f"at most {item.max_length} long")
    if low.startswith("≥") and high.startswith("≤"):
        parts.insert(0, f"{low[2:]}{DASH}{high[2:]}")
    else:
        parts[:0] = [p for p in (low, high) if p]
    return ", ".join(parts)


def value_words(field: FieldInfo) -> str:
    """Its type and limits, as in ``integer, 1 (dash) 10,000``."""
    kind = _type_words(field.annotation)
    limits = _limits(field)
    return f"{kind}, {limits}" if limits else kind


def _toml(value: Any) -> str:
    """A value as it is written in worker.toml (JSON where TOML has no word for it)."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return json.dumps(value, ensure_ascii=False)


def default_words(value: Any) -> str:
    """A default for a table cell."""
    if value is REQUIRED:
        return "required"
    if value is None:
        return "unset"
    if value == {} or value == []:
        return "none"
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, Mapping) and all(
        isinstance(v, list) and all(isinstance(m, BaseModel) for m in v) for v in value.values()
    ):
        return ", ".join(
            f"`{name}` ({len(models)} models, below)" for name, models in value.items()
        )
    if isinstance(value, list):
        return ", ".join(f"`{v}`" for v in value)
    if isinstance(value, str):
        return f"`{value}`"
    return f"`{_toml(value)}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _meaning(field: FieldInfo, name: str) -> str:
    text = (field.description or "").strip()
    if not text:
        raise ValueError(f"{name} has no description: add description= to its Field")
    return _cell(text if text.endswith((".", "!", "?")) else text + ".")


def _table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    head = list(header)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --- the tables ----------------------------------------------------------------------


def settings_table() -> str:
    rows = []
    for name, field in Settings.model_fields.items():
        rows.append(
            (
                f"`{name}`",
                f"`{env_name(name)}`",
                value_words(field),
                default_words(default_of(field)),
                _meaning(field, name),
            )
        )
    return _table(("Setting (TOML key)", "Environment", "Value", "Default", "Meaning"), rows)


def model_fields_table() -> str:
    rows = []
    for name, field in ModelConfig.model_fields.items():
        rows.append(
            (
                f"`{name}`",
                value_words(field),
                default_words(default_of(field)),
                _meaning(field, name),
            )
        )
    return _table(("Field", "Value", "Default", "Meaning"), rows)


def _set_besides_defaults(model: ModelConfig) -> list[str]:
    out = []
    for name, field in ModelConfig.model_fields.items():
        if name in ("model", "timeout"):
            continue
        value = getattr(model, name)
        if value != default_of(field):
            out.append(f"`{name} = {_toml(value)}`")
    return out


def default_chains_table() -> str:
    rows = []
    for chain, models in default_chains().items():
        for position, model in enumerate(models, start=1):
            besides = ", ".join(_set_besides_defaults(model)) or DASH
            rows.append(
                (f"`{chain}`", str(position), f"`{model.model}`", _number(model.timeout), besides)
            )
    table = _table(("Chain", "#", "Model", "Timeout (s)", "Also set"), rows)
    longest = getattr(Settings.model_construct(), "job_timeout", None)
    if isinstance(longest, int | float):
        table += (
            f"\n\nWith these chains a job runs for at most {_number(longest)} s: the longest "
            "chain's `max_wait` and `timeout` (and `budget_wait` for the cloud models of a "
            "capped chain) added up, plus 30 s."
        )
    return table


SECTIONS: dict[str, Callable[[], str]] = {
    "settings": settings_table,
    "model-fields": model_fields_table,
    "default-chains": default_chains_table,
}


def _region(name: str) -> re.Pattern[str]:
    return re.compile(
        rf"(<!-- {re.escape(name)}:begin -->\n)(.*?)(<!-- {re.escape(name)}:end -->)", re.DOTALL
    )


def update(text: str) -> str:
    """``text`` (docs/configuration.md) with every marked table rendered afresh."""
    for name, render in SECTIONS.items():
        found = _region(name).search(text)
        if found is None:
            raise ValueError(f"missing markers <!-- {name}:begin --> … <!-- {name}:end -->")
        text = text[: found.start(2)] + render() + "\n" + text[found.end(2) :]
    return text


def stale(path: Path = CONFIG_DOC) -> bool:
    """Whether the tables in ``path`` differ from what the models give."""
    text = path.read_text(encoding="utf-8")
    return update(text) != text


def write(path: Path = CONFIG_DOC) -> bool:
    """Render the tables into ``path``; True when it changed."""
    text = path.read_text(encoding="utf-8")
    new = update(text)
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


# --- deploy/worker.toml --------------------------------------------------------------


def commented_keys(text: str) -> set[str]:
    """Keys that appear commented out: ``# name = value``."""
    return set(re.findall(r"^#\s*([a-z_][a-z0-9_]*)\s*=", text, re.MULTILINE))


def documented_model_fields(text: str) -> set[str]:
    """The names listed in the comment block after ``# Fields of one model:``."""
    heading = MODEL_FIELDS_HEADING.search(text)
    if heading is None:
        return set()
    names: set[str] = set()
    for line in text[heading.end() :].splitlines()[1:]:
        if not line.startswith("#") or not line[1:].strip():
            break
        entry = re.match(r"#\s{1,4}([a-z][a-z0-9_]*)\s+\S", line)
        if entry:
            names.add(entry.group(1))
    return names


def _comment_above(text: str, key: str) -> str:
    """The comment lines right above the first line that sets ``key``."""
    lines = text.splitlines()
    start = re.compile(rf"^(?:{re.escape(key)}\s*=|\[\[?{re.escape(key)}[.\]])")
    for index, line in enumerate(lines):
        if start.match(line):
            above: list[str] = []
            for previous in reversed(lines[:index]):
                if not previous.startswith("#"):
                    break
                above.append(previous)
            return "\n".join(reversed(above))
    return ""


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, BaseModel):
        return value.model_dump()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _differences(name: str, given: Any, default: Any) -> list[str]:
    given, default = _plain(given), _plain(default)
    if isinstance(given, list) and isinstance(default, list) and len(given) == len(default):
        pairs = [
            (f"{name}[{i}]", g, d) for i, (g, d) in enumerate(zip(given, default, strict=True))
        ]
    elif isinstance(given, dict) and isinstance(default, dict) and set(given) == set(default):
        pairs = [(f"{name}.{key}", given[key], default[key]) for key in given]
    elif given != default:
        return [
            f"{name} = {_toml(given)} is not the default {_toml(default)} (give the default, "
            f"or say {NOT_DEFAULT!r} in the comment above it)"
        ]
    else:
        return []
    return [problem for where, g, d in pairs for problem in _differences(where, g, d)]


def _disagreements(name: str, given: Any, default: Any) -> list[str]:
    """A table setting (``chains``, ``budgets``) is compared entry by entry, for the
    entries the default has: the file may add chains, not change the built-in ones."""
    if isinstance(default, Mapping) and isinstance(given, Mapping):
        common = sorted(set(default) & set(given))
        return [
            p for key in common for p in _differences(f"{name}.{key}", given[key], default[key])
        ]
    return _differences(name, given, default)


def toml_problems(text: str) -> list[str]:
    """What is wrong with a worker.toml's text; empty when nothing is."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return [f"not TOML: {exc}"]
    problems: list[str] = []
    try:
        validated = Settings.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return [f"not valid settings: {where}: {first['msg']}"]
    commented = commented_keys(text)
    for name in Settings.model_fields:
        if name not in data and name not in commented:
            problems.append(f"setting {name} is missing: give it, or show it as `# {name} = …`")
    in_chains = {key for models in data.get("chains", {}).values() for m in models for key in m}
    listed = documented_model_fields(text)
    for name in ModelConfig.model_fields:
        if name not in in_chains | commented | listed:
            problems.append(
                f"model field {name} is missing: list it under '# Fields of one model:'"
            )
    for name in sorted(listed - set(ModelConfig.model_fields)):
        problems.append(f"'# Fields of one model:' lists {name}, which is no model field")
    for name in data:
        if NOT_DEFAULT in _comment_above(text, name).lower():
            continue
        default = default_of(Settings.model_fields[name])
        problems += _disagreements(name, getattr(validated, name), default)
    return problems


def worker_toml_problems(path: Path = WORKER_TOML) -> list[str]:
    return toml_problems(path.read_text(encoding="utf-8"))


# --- the command ---------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m llm_router_testing.configdoc",
        description="Write docs/configuration.md's tables from the Settings model, and check "
        "that deploy/worker.toml shows every setting with its default.",
    )
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if anything is stale"
    )
    parser.add_argument("--doc", type=Path, default=CONFIG_DOC, help="the configuration page")
    parser.add_argument("--toml", type=Path, default=WORKER_TOML, help="the example worker.toml")
    args = parser.parse_args(argv)
    failed = False
    if args.check:
        if stale(args.doc):
            print(f"stale: {args.doc} (run python -m llm_router_testing.configdoc)")
            failed = True
    elif write(args.doc):
        print(f"wrote {args.doc}")
    for problem in worker_toml_problems(args.toml):
        print(f"{args.toml}: {problem}")
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
