"""Signed checkpoints: signing, verification, the key file, and record seals."""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

import pytest

from services.audit.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointSigner,
    CheckpointVerifier,
    SigningKeyError,
    key_id_of,
)
from services.audit.merkle import leaf_hash

ROOT = leaf_hash(b"root")


def test_sign_and_verify_with_the_exported_public_key(signer: CheckpointSigner) -> None:
    checkpoint = signer.sign("meshllm-audit/test", 42, ROOT, timestamp_ns=123)
    assert (checkpoint.tree_size, checkpoint.root_hash, checkpoint.timestamp_ns) == (42, ROOT, 123)
    assert checkpoint.key_id == key_id_of(signer.public_key) == signer.key_id
    assert len(checkpoint.key_id) == 16
    verifier = CheckpointVerifier.from_pem(signer.public_key_pem())
    verifier.verify(checkpoint)
    assert checkpoint.body() == (
        b"meshllm-audit-checkpoint/v1\nlog meshllm-audit/test\nsize 42\n"
        + f"root {ROOT.hex()}\ntime 123\nkey {signer.key_id}\n".encode()
    )


@pytest.mark.parametrize(
    "change",
    [
        {"tree_size": 43},
        {"root_hash": leaf_hash(b"other")},
        {"timestamp_ns": 124},
        {"log_id": "meshllm-audit/other"},
    ],
    ids=["size", "root", "time", "log"],
)
def test_any_changed_field_breaks_the_signature(
    signer: CheckpointSigner, change: dict[str, object]
) -> None:
    checkpoint = dataclasses.replace(signer.sign("meshllm-audit/test", 42, ROOT, 123), **change)
    with pytest.raises(CheckpointError, match="does not verify"):
        signer.verifier().verify(checkpoint)


def test_a_key_not_trusted_is_named(signer: CheckpointSigner) -> None:
    other = CheckpointSigner.generate()
    checkpoint = other.sign("meshllm-audit/test", 1, ROOT)
    with pytest.raises(CheckpointError, match=f"unknown key {other.key_id}"):
        signer.verifier().verify(checkpoint)
    assert CheckpointVerifier([signer.public_key, other.public_key]).is_valid(checkpoint)


def test_json_round_trip(signer: CheckpointSigner) -> None:
    checkpoint = signer.sign("meshllm-audit/test", 7, ROOT)
    assert Checkpoint.from_json(checkpoint.to_json()) == checkpoint
    with pytest.raises(CheckpointError):
        Checkpoint.from_json({"tree_size": 7})


def test_key_file_is_made_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "signing-key.pem"
    first = CheckpointSigner.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again = CheckpointSigner.load_or_create(path)
    assert again.key_id == first.key_id
    checkpoint = first.sign("meshllm-audit/test", 3, ROOT)
    again.verifier().verify(checkpoint)


def test_a_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "signing-key.pem"
    CheckpointSigner.load_or_create(path)
    os.chmod(path, 0o644)
    with pytest.raises(SigningKeyError, match="chmod 600"):
        CheckpointSigner.load(path)


def test_a_missing_or_foreign_key_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SigningKeyError, match="cannot read"):
        CheckpointSigner.load(tmp_path / "nope.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    os.chmod(junk, 0o600)
    with pytest.raises(SigningKeyError, match="not a PEM private key"):
        CheckpointSigner.load(junk)


def test_seals_bind_log_position_and_hash(signer: CheckpointSigner) -> None:
    seal = signer.sealer("meshllm-audit/a")
    assert seal(5, ROOT) == seal(5, ROOT)
    assert seal(5, ROOT) != seal(6, ROOT)
    assert seal(5, ROOT) != seal(5, leaf_hash(b"other"))
    assert seal(5, ROOT) != signer.sealer("meshllm-audit/b")(5, ROOT)
    assert seal(5, ROOT) != CheckpointSigner.generate().sealer("meshllm-audit/a")(5, ROOT)
