"""The Redis scripts are ``.lua`` files in the packages: none dead, none left in Python.

Each file starts with a ``--`` header documenting its KEYS, ARGV and returns, for
readers and for producers in other languages that run the client's scripts.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from llm_router.client import keys
from llm_router.client import lua as client_lua
from llm_router.client.keys import idle_key, inbox_key, job_key, result_key, wake_key
from llm_router.worker import lua as worker_lua

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "llm_router.client": ROOT / "client" / "src" / "llm_router" / "client",
    "llm_router.worker": ROOT / "worker" / "src" / "llm_router" / "worker",
}
LOADERS = {"llm_router.client": client_lua.script, "llm_router.worker": worker_lua.script}
LOADED = re.compile(r"""\bscript\(\s*["']([\w.-]+\.lua)["']\s*\)""")
REGISTERED = re.compile(r"register_script\(\s*([^,)]*)")


def _py_files(package: str) -> list[Path]:
    return sorted(p for p in PACKAGES[package].rglob("*.py") if "__pycache__" not in p.parts)


def _lua_files(package: str) -> list[Path]:
    return sorted((PACKAGES[package] / "lua").glob("*.lua"))


def _module(package: str, path: Path) -> str:
    rel = path.relative_to(PACKAGES[package]).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join([package, *parts])


def _header(text: str) -> str:
    lines = text.splitlines()
    head = []
    for line in lines:
        if not line.startswith("--"):
            break
        head.append(line)
    return "\n".join(head)


ALL_LUA = [(pkg, path) for pkg in PACKAGES for path in _lua_files(pkg)]


def test_both_packages_ship_scripts() -> None:
    assert _lua_files("llm_router.client")
    assert _lua_files("llm_router.worker")


@pytest.mark.parametrize("package", list(PACKAGES))
def test_every_lua_file_is_loaded_and_every_load_has_a_file(package: str) -> None:
    loaded: set[str] = set()
    for path in _py_files(package):
        loaded.update(LOADED.findall(path.read_text(encoding="utf-8")))
    files = {p.name for p in _lua_files(package)}
    assert files - loaded == set(), "dead .lua files: loaded by no module"
    assert loaded - files == set(), "scripts loaded that have no file"


@pytest.mark.parametrize(("package", "path"), ALL_LUA, ids=lambda v: getattr(v, "name", v))
def test_loader_reads_the_file(package: str, path: Path) -> None:
    assert LOADERS[package](path.name) == path.read_text(encoding="utf-8")


@pytest.mark.parametrize("package", list(PACKAGES))
def test_no_lua_left_in_python(package: str) -> None:
    for path in _py_files(package):
        text = path.read_text(encoding="utf-8")
        assert "redis.call(" not in text, f"{path}: Lua in a Python file"
        assert "redis.pcall(" not in text, f"{path}: Lua in a Python file"


@pytest.mark.parametrize("package", list(PACKAGES))
def test_every_registered_script_comes_from_a_file(package: str) -> None:
    texts = {p.read_text(encoding="utf-8") for pkg in PACKAGES for p in _lua_files(pkg)}
    found = 0
    for path in _py_files(package):
        names = REGISTERED.findall(path.read_text(encoding="utf-8"))
        if not names:
            continue
        module = importlib.import_module(_module(package, path))
        for name in names:
            name = name.strip()
            assert re.fullmatch(r"[A-Za-z_][\w.]*", name), f"{path}: registers {name!r}"
            value: object = module
            for part in name.split("."):
                value = getattr(value, part)
            assert value in texts, f"{path}: {name} is not the text of a .lua file"
            found += 1
    assert found > 0


@pytest.mark.parametrize(("package", "path"), ALL_LUA, ids=lambda v: getattr(v, "name", v))
def test_header_documents_keys_argv_and_returns(package: str, path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    header = _header(text)
    assert header.startswith(f"-- {path.name}:"), "the header opens with the file's name"
    for word in ("KEYS", "ARGV", "Returns"):
        assert word in header, f"{path.name}: the header does not document {word}"
    body = text[len(header) :]
    assert "redis.call(" in body, "a script after the header"
    used = {int(n) for n in re.findall(r"KEYS\[(\d+)\]", body)}
    used_args = {int(n) for n in re.findall(r"ARGV\[(\d+)\]", body)}
    # Every fixed KEYS/ARGV index the script reads is numbered in its header.
    keys_part, _, rest = header.partition("\n-- ARGV")
    for n in used:
        assert re.search(rf"\b{n}\.|KEYS\[{n}\]", keys_part), f"{path.name}: KEYS[{n}]"
    for n in used_args:
        assert re.search(rf"\b{n}[.,]|ARGV\[{n}\]", rest), f"{path.name}: ARGV[{n}]"


def test_enqueue_header_names_the_real_keys() -> None:
    """A producer in another language builds the keys from the header: they must be right."""
    header = _header(client_lua.script("enqueue.lua"))
    for key in (
        job_key("<id>"),
        result_key("<id>"),
        wake_key("<queue>"),
        idle_key("<queue>"),
        inbox_key("<queue>", ""),
        "arq:in-progress:<id>",
        "arq:retry:<id>",
    ):
        assert key in header, key
    keys_part = header.partition("\n-- ARGV")[0]
    documented = re.findall(r"^--\s+\d+\.\s+(\S+)", keys_part, flags=re.M)
    # In the order RouterClient.enqueue_request passes them.
    queue = "<queue>"
    assert documented == [
        job_key("<id>"),
        result_key("<id>"),
        queue,
        wake_key(queue),
        idle_key(queue),
    ]


def test_key_names_the_scripts_build_are_the_key_modules() -> None:
    """Scripts that build key names themselves use the prefixes of llm_router.client.keys."""
    prefixes = {v for k, v in vars(keys).items() if k.endswith("PREFIX") and isinstance(v, str)}
    for _, path in ALL_LUA:
        for literal in re.findall(r"'((?:arq|llm_router):[^']*)'", path.read_text()):
            assert literal in prefixes, f"{path.name}: {literal!r} is not a prefix in keys.py"
