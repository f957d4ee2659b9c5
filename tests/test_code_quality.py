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
    }
    assert not clashes, f"rename these packages of ours: {clashes}"


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
