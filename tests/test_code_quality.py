"""Lint, format and type checks run with the suite, so CI enforces them."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        ["mypy"],
    ],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_tool_passes(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_no_top_level_package_shadows_an_installed_distribution() -> None:
    """A package of ours at the repository root is first on sys.path when anything runs from
    here: one named like a published package (``kernels`` once) hides that package from the
    libraries that import it (transformers does)."""
    ours = {path.name for path in ROOT.iterdir() if (path / "__init__.py").exists()}
    provided = importlib.metadata.packages_distributions()
    clashes = {
        name: others
        for name in sorted(ours)
        if (others := [d for d in provided.get(name, []) if d.lower() != "meshllm"])
        and set(others) - STRAY_PACKAGES.get(name, set())
    }
    assert not clashes, f"rename these packages of ours: {clashes}"


# Top-level packages a distribution's wheel installs beside its real one without importing
# them itself (its repository's benchmark scripts): ours may share the name.
STRAY_PACKAGES = {"benchmarks": {"opacus"}}


@pytest.mark.parametrize("name", sorted(STRAY_PACKAGES))
def test_stray_packages_are_unused_by_their_distribution_and_ours_come_first(name: str) -> None:
    for distribution in STRAY_PACKAGES[name]:
        files = importlib.metadata.files(distribution) or []
        sources = [f for f in files if f.suffix == ".py" and f.parts[0] != name]
        assert sources, f"{distribution} is not installed"
        importing = re.compile(rf"^\s*(from|import)\s+{name}\b", re.MULTILINE)
        users = [str(f) for f in sources if importing.search(f.read_text(encoding="utf-8"))]
        assert not users, f"{distribution} imports its {name} package: rename ours ({users})"
    found = subprocess.run(
        [sys.executable, "-c", f"import {name}; print({name}.__file__)"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert found == str(ROOT / name / "__init__.py")


def test_constraints_pin_every_requirement() -> None:
    """Installs come from constraints.txt: every dependency the project names has an exact pin
    there (refresh with `just lock`)."""
    pins = {
        line.split("==")[0]
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    }
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    named = [*project["dependencies"]]
    for extra, requirements in project["optional-dependencies"].items():
        if extra != "vllm":  # GPU machines only; not in the CPU lock
            named += requirements
    names = {
        re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        for requirement in named
    }
    missing = sorted(name for name in names if name != "meshllm" and name not in pins)
    assert not missing, f"not pinned in constraints.txt (run `just lock`): {missing}"


def test_settings_and_the_engine_contract_do_not_load_torch() -> None:
    """The inference service's settings, its engine protocol and the vLLM adapter import
    without the CPU engine's model code (torch): a settings check or a GPU pool's process
    should not pay for it."""
    light = [
        "services.inference.settings",
        "services.inference.engine_protocol",
        "services.inference.generation",
        "services.inference.vllm_engine",
    ]
    code = f"import sys\nfor m in {light!r}: __import__(m)\nprint('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_topics_are_named_only_through_the_registry() -> None:
    """A topic's name is written once, in shared/topics.py; code elsewhere uses its constant."""
    from shared.topics import REGISTRY

    names = {topic.name for topic in REGISTRY} | {f"{topic.name}.dlq" for topic in REGISTRY}
    found = []
    for folder in ("services", "shared", "meshllm"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "shared" / "topics.py" or "events/v1" in path.as_posix():
                continue
            text = path.read_text()
            found += [
                f"{path.relative_to(ROOT)}: {name}"
                for name in names
                if f'"{name}"' in text or f"'{name}'" in text
            ]
    assert not found, "\n".join(found)
