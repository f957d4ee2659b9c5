"""Signed checkpoints: the audit log's tree head, signed with Ed25519.

A checkpoint says "log ``log_id`` had ``tree_size`` records with root ``root_hash`` at
``timestamp``", signed by the key ``key_id`` over this exact text (UTF-8, each line ending
with a newline)::

    meshllm-audit-checkpoint/v1
    log <log_id>
    size <tree_size>
    root <root_hash, 64 lowercase hex digits>
    time <timestamp, nanoseconds since the epoch>
    key <key_id>

``key_id`` is the first 8 bytes of SHA-256 of the raw 32-byte public key, in hex. An offline
verifier needs only the public key (``meshllm audit public-key`` exports it as PEM).

The private key lives in one PEM (PKCS#8) file, created on first use with mode 0600; a key file
that group or others may read is refused. The same key also derives (HKDF-SHA256) the secret of
the *record seals*: per record, the key id then an HMAC-SHA256 over (log id, leaf index, leaf
hash). They let a verifier holding the key name the exact record an attacker rewrote, moved or
renumbered, where signed roots alone name the range between two checkpoints.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from services.audit.merkle import HASH_SIZE
from services.audit.records import Sealer, iso

HEADER = "meshllm-audit-checkpoint/v1"
SEAL_CONTEXT = b"meshllm-audit-seal/v1"
_LOG_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")


class CheckpointError(ValueError):
    """A checkpoint whose signature does not verify, or that cannot be read."""


class SigningKeyError(RuntimeError):
    """The signing key file is missing, unreadable, malformed or too widely readable."""


def key_id_of(public_key: Ed25519PublicKey) -> str:
    """The key id: hex of the first 8 bytes of SHA-256 of the raw public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).digest()[:8].hex()


def public_key_from_pem(pem: bytes) -> Ed25519PublicKey:
    """Raises:
    CheckpointError: the PEM is not an Ed25519 public key (SubjectPublicKeyInfo).
    """
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as error:
        raise CheckpointError(f"not a PEM public key: {error}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise CheckpointError(f"not an Ed25519 public key: {type(key).__name__}")
    return key


def validate_log_id(log_id: str) -> str:
    if not _LOG_ID.fullmatch(log_id):
        raise ValueError(
            f"log id {log_id!r} is invalid: use 1 to 128 letters, digits or ._:/- "
            "(starting with a letter or digit)"
        )
    return log_id


def checkpoint_body(
    log_id: str, tree_size: int, root_hash: bytes, timestamp_ns: int, key_id: str
) -> bytes:
    """The exact bytes a checkpoint's signature covers."""
    validate_log_id(log_id)
    if tree_size < 0 or len(root_hash) != HASH_SIZE:
        raise ValueError("a checkpoint needs a size >= 0 and a 32-byte root hash")
    return (
        f"{HEADER}\nlog {log_id}\nsize {tree_size}\nroot {root_hash.hex()}\n"
        f"time {timestamp_ns}\nkey {key_id}\n"
    ).encode()


@dataclass(frozen=True)
class Checkpoint:
    """A signed tree head."""

    log_id: str
    tree_size: int
    root_hash: bytes
    timestamp_ns: int
    key_id: str
    signature: bytes

    def body(self) -> bytes:
        return checkpoint_body(
            self.log_id, self.tree_size, self.root_hash, self.timestamp_ns, self.key_id
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "log_id": self.log_id,
            "tree_size": self.tree_size,
            "root_hash": self.root_hash.hex(),
            "timestamp": iso(self.timestamp_ns),
            "timestamp_ns": self.timestamp_ns,
            "key_id": self.key_id,
            "signature": base64.b64encode(self.signature).decode(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Checkpoint:
        """Read :meth:`to_json`'s form back (the signature is not checked here).

        Raises:
            CheckpointError: naming the missing or malformed field.
        """
        try:
            return cls(
                log_id=str(data["log_id"]),
                tree_size=int(data["tree_size"]),
                root_hash=bytes.fromhex(data["root_hash"]),
                timestamp_ns=int(data["timestamp_ns"]),
                key_id=str(data["key_id"]),
                signature=base64.b64decode(data["signature"], validate=True),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"not a checkpoint: {error!r}") from None


def seal_secret(private_key: Ed25519PrivateKey) -> bytes:
    """The record-seal secret derived from the signing key (HKDF-SHA256)."""
    raw = private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=SEAL_CONTEXT).derive(raw)


def record_seal(secret: bytes, log_id: str, leaf_index: int, leaf: bytes) -> bytes:
    """HMAC-SHA256 over (log id, leaf index, leaf hash)."""
    message = b"%s\n%s\n%s" % (log_id.encode(), leaf_index.to_bytes(8, "big"), leaf)
    return hmac.new(secret, message, hashlib.sha256).digest()


class CheckpointVerifier:
    """Checks checkpoint signatures against trusted public keys."""

    def __init__(self, public_keys: Iterable[Ed25519PublicKey]) -> None:
        self._keys = {key_id_of(key): key for key in public_keys}
        if not self._keys:
            raise ValueError("a verifier needs at least one public key")

    @classmethod
    def from_pem(cls, *pems: bytes) -> CheckpointVerifier:
        """From PEM public keys (SubjectPublicKeyInfo), as ``meshllm audit public-key`` writes.

        Raises:
            CheckpointError: for a PEM that is not an Ed25519 public key.
        """
        return cls(public_key_from_pem(pem) for pem in pems)

    @classmethod
    def from_files(cls, paths: Iterable[Path]) -> CheckpointVerifier:
        return cls.from_pem(*(Path(path).read_bytes() for path in paths))

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def verify(self, checkpoint: Checkpoint) -> None:
        """Raises:
        CheckpointError: the key is unknown or the signature does not verify.
        """
        key = self._keys.get(checkpoint.key_id)
        if key is None:
            raise CheckpointError(
                f"checkpoint at size {checkpoint.tree_size} is signed by unknown key "
                f"{checkpoint.key_id} (trusted: {', '.join(self._keys)})"
            )
        try:
            key.verify(checkpoint.signature, checkpoint.body())
        except (InvalidSignature, ValueError):
            raise CheckpointError(
                f"checkpoint at size {checkpoint.tree_size}: the signature does not verify"
            ) from None

    def is_valid(self, checkpoint: Checkpoint) -> bool:
        try:
            self.verify(checkpoint)
        except CheckpointError:
            return False
        return True


class CheckpointSigner:
    """Signs checkpoints and seals records with one Ed25519 private key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self.public_key = private_key.public_key()
        self.key_id = key_id_of(self.public_key)
        self._seal_secret = seal_secret(private_key)

    @classmethod
    def generate(cls) -> CheckpointSigner:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> CheckpointSigner:
        """Read the key file.

        Raises:
            SigningKeyError: missing, readable by group or others, or not an Ed25519 key.
        """
        path = Path(path)
        try:
            mode = path.stat().st_mode
            data = path.read_bytes()
        except OSError as error:
            raise SigningKeyError(f"cannot read the audit signing key {path}: {error}") from None
        if stat.S_IMODE(mode) & 0o077:
            raise SigningKeyError(
                f"the audit signing key {path} has mode {stat.S_IMODE(mode):04o}; "
                f"it must not be readable by group or others (chmod 600 {path})"
            )
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as error:
            raise SigningKeyError(f"{path} is not a PEM private key: {error}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise SigningKeyError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: Path) -> CheckpointSigner:
        """Read the key file, creating it (mode 0600, parent 0700) when it does not exist."""
        path = Path(path)
        if not path.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            # written whole to a temporary file, then linked into place: a crash leaves no
            # empty key behind, and of two processes racing, the first link wins
            temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(pem)
                out.flush()
                os.fsync(out.fileno())
            try:
                os.link(temporary, path)
            except FileExistsError:  # another process made it first: use theirs
                pass
            finally:
                temporary.unlink()
        return cls.load(path)

    def public_key_pem(self) -> bytes:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def verifier(self) -> CheckpointVerifier:
        return CheckpointVerifier([self.public_key])

    def sign(
        self, log_id: str, tree_size: int, root_hash: bytes, timestamp_ns: int | None = None
    ) -> Checkpoint:
        """A checkpoint of ``log_id`` at ``tree_size`` with ``root_hash``, signed now."""
        timestamp_ns = time.time_ns() if timestamp_ns is None else timestamp_ns
        body = checkpoint_body(log_id, tree_size, root_hash, timestamp_ns, self.key_id)
        return Checkpoint(
            log_id=log_id,
            tree_size=tree_size,
            root_hash=root_hash,
            timestamp_ns=timestamp_ns,
            key_id=self.key_id,
            signature=self._private_key.sign(body),
        )

    def sealer(self, log_id: str) -> Sealer:
        """The record-seal function of ``log_id``: ``(leaf_index, leaf_hash) -> seal``.

        A seal is this key's id (8 bytes) then the HMAC (32 bytes), so that after a key
        rotation a verifier tells records sealed by another key from forged seals.
        """
        secret, prefix = self._seal_secret, bytes.fromhex(self.key_id)

        def seal(leaf_index: int, leaf: bytes) -> bytes:
            return prefix + record_seal(secret, log_id, leaf_index, leaf)

        return seal
