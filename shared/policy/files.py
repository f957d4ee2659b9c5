"""The policy set as files: ``.rego`` modules and a data document, read and checked once."""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.policy.decision import PolicyError

DATA_FILE = "data.json"
_PACKAGE = re.compile(r"^[ \t]*package[ \t]+([A-Za-z_][\w.]*)", re.MULTILINE)


@dataclass(frozen=True)
class PolicySource:
    """One Rego module: where it came from, its text and its package (``meshllm.authz``)."""

    path: Path
    text: str
    package: str


@dataclass(frozen=True)
class PolicyBundle:
    """The modules and the data document (``data``) that both evaluators load."""

    sources: tuple[PolicySource, ...]
    data: Mapping[str, Any] | None = None

    @classmethod
    def load(cls, paths: Sequence[Path], data: Mapping[str, Any] | None = None) -> PolicyBundle:
        """Read ``paths``: ``.rego`` files, or directories whose ``*.rego`` files (not
        ``*_test.rego``) are loaded; ``data`` is the data document.

        Raises:
            PolicyError: a file is missing, unreadable or has no ``package`` line, no policy
                was given, or the data is not JSON or breaks the rules of
                :func:`check_data` (the message names the file or the data field).
        """
        sources = []
        for file in _rego_files(paths):
            try:
                text = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as error:
                raise PolicyError(f"policy file {file}: {error}") from None
            package = _PACKAGE.search(text)
            if package is None:
                raise PolicyError(f"policy file {file}: no package line")
            sources.append(PolicySource(file, text, package.group(1)))
        if data is not None:
            try:
                data = json.loads(json.dumps(dict(data)))
            except (TypeError, ValueError) as error:
                raise PolicyError(f"policy data: {error}") from None
            check_data(data)
        return cls(tuple(sources), data)

    @classmethod
    def from_dir(cls, directory: Path) -> PolicyBundle:
        """The ``*.rego`` files of ``directory`` with its ``data.json`` (if any) as data.

        Raises:
            PolicyError: as :meth:`load`, or ``data.json`` is not a JSON object.
        """
        directory = Path(directory)
        return cls.load([directory], read_data(directory / DATA_FILE))

    @property
    def files(self) -> list[Path]:
        return [source.path for source in self.sources]

    @property
    def data_json(self) -> str | None:
        return None if self.data is None else json.dumps(self.data)


def read_data(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when there is no such file.

    Raises:
        PolicyError: the file is unreadable, not JSON, or not an object.
    """
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise PolicyError(f"policy data {path}: {error}") from None
    if not isinstance(data, dict):
        raise PolicyError(f"policy data {path}: must be a JSON object")
    return data


def check_data(data: Mapping[str, Any]) -> None:
    """Check what would otherwise fail each evaluation, naming the field: the hours and
    networks of ``meshllm.roles`` and ``meshllm.tenants``, and that each alias names a role.

    Raises:
        PolicyError: naming the field and what is wrong with it.
    """
    meshllm = data.get("meshllm")
    if meshllm is None:
        return
    if not isinstance(meshllm, dict):
        raise PolicyError("policy data: meshllm must be an object")
    roles = meshllm.get("roles", {})
    for section in ("roles", "tenants", "aliases"):
        if not isinstance(meshllm.get(section, {}), dict):
            raise PolicyError(f"policy data: meshllm.{section} must be an object")
    for section in ("roles", "tenants"):
        for name, rules in meshllm.get(section, {}).items():
            where = f"meshllm.{section}.{name}"
            if not isinstance(rules, dict):
                raise PolicyError(f"policy data: {where} must be an object")
            _check_hours(f"{where}.hours_utc", rules.get("hours_utc"))
            _check_networks(f"{where}.networks", rules.get("networks"))
    for alias, role in meshllm.get("aliases", {}).items():
        if role not in roles:
            raise PolicyError(f"policy data: meshllm.aliases.{alias} names no role ({role!r})")


def _check_hours(where: str, hours: Any) -> None:
    if hours is None:
        return
    if not isinstance(hours, list):
        raise PolicyError(f"policy data: {where} must be a list of [from, to] UTC hours")
    for window in hours:
        if not (
            isinstance(window, list)
            and len(window) == 2
            and all(type(hour) is int and 0 <= hour <= 24 for hour in window)
        ):
            raise PolicyError(
                f"policy data: {where}: {window!r} is not [from, to] with hours 0 to 24"
            )


def _check_networks(where: str, networks: Any) -> None:
    if networks is None:
        return
    if not isinstance(networks, list):
        raise PolicyError(f"policy data: {where} must be a list of CIDR networks")
    for network in networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except (TypeError, ValueError):
            raise PolicyError(f"policy data: {where}: {network!r} is not a network") from None


def _rego_files(paths: Sequence[Path]) -> list[Path]:
    if not paths:
        raise PolicyError("no policy files given")
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.glob("*.rego") if not p.name.endswith("_test.rego"))
            if not found:
                raise PolicyError(f"policy directory {path} holds no .rego files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise PolicyError(f"policy file {path} does not exist")
    return files
