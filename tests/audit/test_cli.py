"""`meshllm audit`: verify a store, a record, two checkpoints, a proof file; export keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from meshllm.cli import app
from services.audit.checkpoint import CheckpointSigner
from services.audit.log import AuditLog
from services.audit.merkle import leaf_hash
from services.audit.sqlite_store import SqliteAuditStore
from tests.audit.helpers import raw_events
from tests.conftest import ROOT

runner = CliRunner()


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data directory holding a 20-record log (checkpoints at 5, 10, 15, 20) and its key."""
    for name in list(os.environ):
        if name.startswith("MESHLLM_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MESHLLM_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "250")
    signer = CheckpointSigner.load_or_create(tmp_path / "audit" / "signing-key.pem")
    with SqliteAuditStore(tmp_path / "audit" / "audit.sqlite") as store:
        log = AuditLog(store, signer)
        for _ in range(4):
            log.append(raw_events(5))
            log.checkpoint()
    return tmp_path


def _db(data_dir: Path) -> Path:
    return data_dir / "audit" / "audit.sqlite"


def _tamper(data_dir: Path, sql: str, *values: object) -> None:
    with SqliteAuditStore(_db(data_dir)) as store:
        store._db.execute(sql, values)


def test_verify_a_sound_store(data_dir: Path) -> None:
    result = runner.invoke(app, ["audit", "verify"])
    assert result.exit_code == 0, result.output
    assert "OK" in result.output
    data = json.loads(runner.invoke(app, ["audit", "verify", "--json"]).output)
    assert (data["ok"], data["records"], data["checkpoints_matched"], data["seals_checked"]) == (
        True,
        20,
        4,
        20,
    )


def test_verify_names_the_first_bad_record(data_dir: Path) -> None:
    with SqliteAuditStore(_db(data_dir)) as store:
        victim = store.get(7)
    assert victim is not None
    forged = (victim.raw or b"")[:-1] + b"!"
    _tamper(data_dir, "UPDATE records SET event = ?, leaf_hash = ? WHERE leaf_index = 7",
            forged, leaf_hash(forged))  # fmt: skip
    result = runner.invoke(app, ["audit", "verify"])
    assert result.exit_code == 1
    assert "FIRST PROBLEM" in result.output
    assert "seal-mismatch" in result.output
    assert f"leaf 7 (event {victim.event_id})" in result.output

    public = data_dir / "public.pem"
    assert runner.invoke(app, ["audit", "public-key", "--out", str(public)]).exit_code == 0
    key_gone = ["--signing-key", str(data_dir / "nowhere.pem")]
    result = runner.invoke(app, ["audit", "verify", "--public-key", str(public), "--json"])
    assert json.loads(result.output)["first_problem"]["kind"] == "seal-mismatch"
    os.rename(data_dir / "audit" / "signing-key.pem", data_dir / "moved.pem")
    result = runner.invoke(app, ["audit", "verify", "--public-key", str(public), "--json"])
    assert result.exit_code == 1
    first = json.loads(result.output)["first_problem"]
    assert (first["kind"], first["leaf_index"], first["end_index"]) == ("root-mismatch", 5, 10)
    assert runner.invoke(app, ["audit", "verify", *key_gone]).exit_code == 2


def test_verify_without_any_key_is_a_usage_error(data_dir: Path) -> None:
    os.remove(data_dir / "audit" / "signing-key.pem")
    result = runner.invoke(app, ["audit", "verify"])
    assert result.exit_code == 2
    assert "--public-key" in result.output


def test_verify_a_missing_store_is_a_usage_error(data_dir: Path) -> None:
    result = runner.invoke(app, ["audit", "verify", "--db", str(data_dir / "nope.sqlite")])
    assert result.exit_code == 2
    assert "no audit store" in result.output


def test_verify_one_record_and_two_checkpoints(data_dir: Path) -> None:
    result = runner.invoke(app, ["audit", "verify", "--record", "12"])
    assert result.exit_code == 0, result.output
    assert "checkpoint: size 20" in result.output
    result = runner.invoke(app, ["audit", "verify", "--record", "12", "--size", "15", "--json"])
    data = json.loads(result.output)
    assert (data["ok"], data["inclusion"]["tree_size"]) == (True, 15)
    assert runner.invoke(app, ["audit", "verify", "--record", "99"]).exit_code == 1
    result = runner.invoke(app, ["audit", "verify", "--consistency", "5", "20"])
    assert result.exit_code == 0, result.output
    assert "consistency proof" in result.output

    _tamper(data_dir, "DELETE FROM records WHERE leaf_index >= 17")
    result = runner.invoke(app, ["audit", "verify", "--consistency", "5", "20", "--json"])
    assert result.exit_code == 1
    assert json.loads(result.output)["first_problem"]["kind"] == "truncated"
    result = runner.invoke(app, ["audit", "verify"])
    assert result.exit_code == 1
    assert "leaves 17..19 were removed" in result.output


def test_exported_checkpoints_and_proof_files(data_dir: Path) -> None:
    listed = runner.invoke(app, ["audit", "checkpoints", "--latest", "--json"])
    assert listed.exit_code == 0, listed.output
    (latest,) = json.loads(listed.output)
    assert latest["tree_size"] == 20
    saved = data_dir / "checkpoint.json"
    saved.write_text(listed.output)
    assert "20" in runner.invoke(app, ["audit", "checkpoints"]).output

    _tamper(data_dir, "DELETE FROM records WHERE leaf_index >= 18")
    _tamper(data_dir, "DELETE FROM checkpoints WHERE tree_size > 15")
    assert runner.invoke(app, ["audit", "verify"]).exit_code == 0
    result = runner.invoke(app, ["audit", "verify", "--checkpoint", str(saved), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.output)["first_problem"]["kind"] == "truncated"

    signer = CheckpointSigner.load(data_dir / "audit" / "signing-key.pem")
    with SqliteAuditStore(_db(data_dir)) as store:
        bundle = AuditLog(store, signer, check=False).record_proof(leaf_index=4)
    proof = data_dir / "proof.json"
    proof.write_text(json.dumps(bundle.to_json()))
    public = data_dir / "public.pem"
    public.write_bytes(signer.public_key_pem())
    args = ["audit", "verify", "--proof", str(proof), "--public-key", str(public)]
    result = runner.invoke(
        app, [*args, "--signing-key", str(data_dir / "audit" / "signing-key.pem")]
    )
    assert result.exit_code == 0, result.output
    data = bundle.to_json()
    data["inclusion"]["leaf_index"] = 3
    proof.write_text(json.dumps(data))
    assert runner.invoke(app, args).exit_code == 1


def test_public_key_is_printed(data_dir: Path) -> None:
    result = runner.invoke(app, ["audit", "public-key"])
    assert result.exit_code == 0
    assert result.output.startswith("-----BEGIN PUBLIC KEY-----")


def test_the_command_runs_as_a_process(data_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ok = subprocess.run(
        [sys.executable, "-m", "meshllm", "audit", "verify"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stdout + ok.stderr
    _tamper(data_dir, "DELETE FROM records WHERE leaf_index = 3")
    bad = subprocess.run(
        [sys.executable, "-m", "meshllm", "audit", "verify"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert bad.returncode == 1
    assert "leaf 3 is missing" in bad.stdout
