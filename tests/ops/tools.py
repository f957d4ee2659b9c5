"""Prometheus' tools for the ops tests, from Debian's packages: installed when missing and
the tests run as root (with apt), else the test fails naming the package."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def debian_tool(names: tuple[str, ...], package: str, purpose: str) -> str:
    """The first of ``names`` on the PATH, installing ``package`` first when none is."""

    def found() -> str | None:
        return next((path for name in names if (path := shutil.which(name))), None)

    if found() is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", package],
            check=False, capture_output=True, timeout=900,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )  # fmt: skip
    path = found()
    if path is None:
        pytest.fail(
            f"{names[0]} is missing: install it (Debian: apt-get install {package}), "
            f"which these tests use {purpose}; run them as root to have them install it"
        )
    return path
