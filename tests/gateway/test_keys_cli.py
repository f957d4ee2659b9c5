"""`meshllm keys`: create, list and revoke API keys in the gateway's database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.gateway.auth import AuthError, KeyStore
from tests.conftest import ROOT


def meshllm(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHLLM_")}
    env.update({"MESHLLM_DATA_DIR": str(data_dir), "PYTHONPATH": str(ROOT), "COLUMNS": "200"})
    return subprocess.run(
        [sys.executable, "-m", "meshllm", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_create_list_revoke(tmp_path: Path) -> None:
    created = meshllm(
        tmp_path, "keys", "create", "--tenant", "acme", "--role", "user", "--role", "batch",
        "--name", "nightly", "--rpm", "30",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("mk-")
    assert "will not be shown again" in created.stderr
    database = tmp_path / "gateway" / "keys.sqlite"
    with KeyStore(database) as store:
        principal = store.verify(key)
    assert principal.key_id is not None
    assert (principal.tenant, principal.roles, principal.rpm) == ("acme", ("user", "batch"), 30)

    listed = meshllm(tmp_path, "keys", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    records = json.loads(listed.stdout)
    assert [(r["key_id"], r["tenant"], r["roles"], r["name"]) for r in records] == [
        (principal.key_id, "acme", ["user", "batch"], "nightly")
    ]
    assert records[0]["revoked_at"] is None
    assert key[16:] not in listed.stdout
    table = meshllm(tmp_path, "keys", "list")
    assert table.returncode == 0
    assert principal.key_id in table.stdout
    assert "active" in table.stdout

    revoked = meshllm(tmp_path, "keys", "revoke", principal.key_id)
    assert revoked.returncode == 0, revoked.stderr
    with KeyStore(database) as store, pytest.raises(AuthError):
        store.verify(key)
    again = meshllm(tmp_path, "keys", "revoke", principal.key_id)
    assert again.returncode == 1
    assert "no active key" in again.stderr
    assert json.loads(meshllm(tmp_path, "keys", "list", "--json").stdout)[0]["revoked_at"]


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--tenant", "Not Valid", "--role", "user"], "tenant 'Not Valid' is invalid"),
        (["--tenant", "acme", "--role", "BAD"], "roles: 'BAD' is invalid"),
        (["--tenant", "acme", "--role", "user", "--rpm", "0"], "rpm must be a positive"),
    ],
)
def test_invalid_keys_are_refused_with_exit_2(
    tmp_path: Path, args: list[str], complaint: str
) -> None:
    result = meshllm(tmp_path, "keys", "create", *args)
    assert result.returncode == 2
    assert complaint in result.stderr
    assert "mk-" not in result.stdout
