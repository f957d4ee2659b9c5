"""What the ``meshllm`` commands share: their settings, and the running mesh's state file."""

from __future__ import annotations

import json
from typing import Any, TypeVar

import typer
from rich.console import Console

from meshllm.supervisor import state_path
from shared.settings import MeshSettings, SettingsError, load_settings

errors = Console(stderr=True, soft_wrap=True)
S = TypeVar("S", bound=MeshSettings)


def cli_settings() -> MeshSettings:
    """The mesh's settings as the command line reads them; exit 2 naming a bad one."""
    return service_settings(MeshSettings, "meshllm")


def service_settings(kind: type[S], service_name: str) -> S:
    """A service's settings as the command line reads them; exit 2 naming a bad one."""
    try:
        return load_settings(kind, service_name=service_name)
    except SettingsError as error:
        errors.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None


def read_state(settings: MeshSettings) -> dict[str, Any] | None:
    """The state file a running ``meshllm up`` keeps (None: none is running here)."""
    try:
        return json.loads(state_path(settings).read_text())  # type: ignore[no-any-return]
    except (FileNotFoundError, json.JSONDecodeError):
        return None
