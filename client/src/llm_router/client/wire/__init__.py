"""The wire protocol's JSON Schemas, shipped with the client package.

``request``, ``result`` and ``metrics_event`` (files ``<name>.schema.json`` in
this folder, draft 2020-12) are generated from the pydantic models that both
sides use — :class:`~llm_router.client.protocol.RouteRequest`,
:class:`~llm_router.client.protocol.RouteResult` and
:class:`~llm_router.client.events.MetricsEvent` — so that a producer in any
language can check what it sends and reads. ``python -m llm_router.client.wire``
writes them again after a model changed (``--check``: exit 1 if they are stale);
a unit test fails while the shipped files differ from what the models generate.
The protocol itself is described in ``docs/protocol.md``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from llm_router.client.events import MetricsEvent
from llm_router.client.protocol import (
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    RouteRequest,
    RouteResult,
)

DIALECT = "https://json-schema.org/draft/2020-12/schema"
NAMES = ("request", "result", "metrics_event")


def schema_id(name: str) -> str:
    return f"urn:llm-router:protocol:v{PROTOCOL_VERSION}:{name}"


def file_name(name: str) -> str:
    return f"{name}.schema.json"


def _request() -> dict[str, Any]:
    generated = RouteRequest.model_json_schema(by_alias=True, mode="validation")
    # The model refuses other versions, and a newer version's fields in an older version's
    # request, in validators; say so in the schema too.
    generated["properties"]["v"]["enum"] = list(SUPPORTED_VERSIONS)
    generated["allOf"] = [
        {
            "if": {"required": [name]},
            "then": {"required": ["v"], "properties": {"v": {"minimum": version}}},
        }
        for name, version in (("expires_in", 2), ("cache_ttl", 3))
    ]
    return generated


def _result() -> dict[str, Any]:
    return RouteResult.model_json_schema(mode="serialization")


def _metrics_event() -> dict[str, Any]:
    return MetricsEvent.model_json_schema(mode="serialization")


_GENERATORS: dict[str, Callable[[], dict[str, Any]]] = {
    "request": _request,
    "result": _result,
    "metrics_event": _metrics_event,
}


def generate(name: str) -> dict[str, Any]:
    """The schema ``name`` as the models describe it now."""
    if name not in _GENERATORS:
        raise ValueError(f"unknown schema {name!r} (known: {', '.join(NAMES)})")
    return {"$schema": DIALECT, "$id": schema_id(name), **_GENERATORS[name]()}


def render(name: str) -> str:
    """The text of the shipped file ``name`` should have."""
    return json.dumps(generate(name), indent=2, ensure_ascii=False) + "\n"


def schema(name: str) -> dict[str, Any]:
    """The shipped schema ``name`` (``request``, ``result`` or ``metrics_event``)."""
    if name not in NAMES:
        raise ValueError(f"unknown schema {name!r} (known: {', '.join(NAMES)})")
    text = resources.files(__package__).joinpath(file_name(name)).read_text(encoding="utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def write(folder: Path | None = None) -> list[Path]:
    """Write every schema file into ``folder`` (this package's folder); return the paths."""
    target = Path(__file__).parent if folder is None else folder
    paths = []
    for name in NAMES:
        path = target / file_name(name)
        path.write_text(render(name), encoding="utf-8")
        paths.append(path)
    return paths


def stale(folder: Path | None = None) -> list[str]:
    """The names whose file in ``folder`` differs from what the models generate."""
    target = Path(__file__).parent if folder is None else folder
    out = []
    for name in NAMES:
        path = target / file_name(name)
        if not path.is_file() or path.read_text(encoding="utf-8") != render(name):
            out.append(name)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m llm_router.client.wire",
        description="Write the wire protocol's JSON Schemas from the pydantic models.",
    )
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if a file is stale"
    )
    args = parser.parse_args(argv)
    if args.check:
        names = stale()
        for name in names:
            print(f"stale: {file_name(name)}")
        return 1 if names else 0
    for path in write():
        print(f"wrote {path}")
    return 0
