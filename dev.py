#!/usr/bin/env python3
"""The README's two commands, with nothing but Python 3.11+ on the machine.

    python3 dev.py demo    # install, then route a few requests end to end
    python3 dev.py test    # install, then ruff, mypy and the whole test suite

Third-party packages come only from requirements.lock, checked against their
hashes; the two workspace packages are installed editable on top.
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
    if command == "demo":
        os.execv(PY, [str(PY), "-m", "llm_router_testing.demo", *argv[1:]])
    if command == "test":
        run(BIN / "ruff", "check", ".")
        run(BIN / "ruff", "format", "--check", ".")
        run(BIN / "mypy")
        ensure_node_example()
        os.execv(PY, [str(PY), "-m", "pytest", *parallel(argv[1:]), *argv[1:]])


if __name__ == "__main__":
    main(sys.argv[1:])
