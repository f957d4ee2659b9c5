"""The version ranges the project admits leave out releases with known vulnerabilities.

constraints.txt pins what the suite runs with, but a user who installs the package without it
gets whatever pyproject.toml admits: its floors must be past each advisory below.
"""

from __future__ import annotations

import tomllib

import pytest
from packaging.requirements import Requirement

from tests.conftest import ROOT

ADVISORIES = [
    # (distribution, a vulnerable release, the advisory)
    ("pyjwt", "2.10.0", "CVE-2024-53861: partial issuer match accepted"),
    ("pypdf", "5.9.0", "CVE-2025-55197: FlateDecode decompression bomb exhausts memory"),
]


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    named = [*project["dependencies"]]
    for requirements in project["optional-dependencies"].values():
        named += requirements
    parsed = (Requirement(text) for text in named)
    return {req.name.lower(): req for req in parsed if req.name.lower() != "meshllm"}


@pytest.mark.parametrize(("name", "vulnerable", "advisory"), ADVISORIES)
def test_vulnerable_releases_are_not_admitted(name: str, vulnerable: str, advisory: str) -> None:
    requirement = _requirements()[name]
    assert vulnerable not in requirement.specifier, f"{requirement} admits {vulnerable}: {advisory}"
