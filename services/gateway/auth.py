"""Who is calling: API keys kept in SQLite, JWTs from a trusted issuer, and the
``Authorization`` header that picks between them.

An API key reads ``mk-<key_id>-<secret>``: ``key_id`` is 12 hex characters that name the
key (in logs, limits and the ``meshllm keys`` command) and ``secret`` is 32 URL-safe
characters (192 random bits). Only a hash of the key is stored.

One module (~500 lines): both kinds of credential and the header that picks between
them produce the same :class:`Principal`, and the key store's schema is only read here.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import json
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from shared.files import private_file

KEY_PREFIX = "mk-"
_KEY = re.compile(r"mk-(?P<key_id>[0-9a-f]{12})-(?P<secret>[A-Za-z0-9_-]{32})")
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_NAME_RULE = "1 to 63 lowercase letters, digits, '_' or '-', starting with a letter or digit"
_SECRET_BYTES = 24  # 32 URL-safe characters
_MAX_CACHED = 10_000
_HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
_PUBLIC_KEY_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
_MIN_HMAC_SECRET_BYTES = 32


@dataclass(frozen=True)
class Principal:
    """An authenticated caller.

    ``subject`` names it in audit records and policy input: ``key:<id>`` for an API key,
    ``jwt:<sub>`` for a token. ``rpm`` and ``tpm`` override the default per-key rate limits
    when set.
    """

    subject: str
    tenant: str
    roles: tuple[str, ...]
    key_id: str | None
    method: Literal["api_key", "jwt"]
    rpm: int | None = None
    tpm: int | None = None


class AuthError(Exception):
    """Credentials are missing or refused; the message is safe to show the caller."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class KeyRecord:
    """What the store knows of an API key, without its secret."""

    key_id: str
    tenant: str
    roles: tuple[str, ...]
    name: str
    rpm: int | None
    tpm: int | None
    created_at: datetime
    revoked_at: datetime | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def principal(self) -> Principal:
        return Principal(
            subject=f"key:{self.key_id}",
            tenant=self.tenant,
            roles=self.roles,
            key_id=self.key_id,
            method="api_key",
            rpm=self.rpm,
            tpm=self.tpm,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "tenant": self.tenant,
            "roles": list(self.roles),
            "name": self.name,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "created_at": self.created_at.isoformat(),
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
        }


def validate_tenant(tenant: str) -> str:
    """Return ``tenant`` if it is a valid tenant name.

    Raises:
        ValueError: naming the ``tenant`` field and the rule it breaks.
    """
    if not isinstance(tenant, str) or not _NAME.fullmatch(tenant):
        raise ValueError(f"tenant {tenant!r} is invalid: use {_NAME_RULE}")
    return tenant


def validate_roles(roles: Iterable[str]) -> tuple[str, ...]:
    """Return the roles without duplicates, in their order, if there is at least one and
    each is a valid name.

    Raises:
        ValueError: naming the ``roles`` field and the role that breaks the rule.
    """
    if isinstance(roles, str):
        roles = [roles]
    unique = tuple(dict.fromkeys(roles))
    if not unique:
        raise ValueError("roles must name at least one role")
    for role in unique:
        if not isinstance(role, str) or not _NAME.fullmatch(role):
            raise ValueError(f"roles: {role!r} is invalid: use {_NAME_RULE}")
    return unique


def _validate_limit(field: str, value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{field} must be a positive integer or unset, not {value!r}")
    return value


def _hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _timestamp(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


@dataclass
class _Cached:
    expires: float
    key_hash: str
    principal: Principal


class KeyStore:
    """API keys in a SQLite file (WAL mode, so several gateway processes can share it).

    Hashing: the store keeps ``sha256(key)``, never the key. The secret is 192 random bits
    from :mod:`secrets`, so it cannot be guessed or precomputed, and a salt or a slow
    password hash (bcrypt, scrypt, argon2) would protect nothing more, while costing tens of
    milliseconds on every verification that misses the cache. The hashed text includes the
    key id, which makes each hash unique per key anyway. A pepper file was not chosen
    either: it would be one more secret to hand to every replica sharing the file, guarding
    against an attacker who can read the database but cannot read the key, which 192-bit
    secrets already cover. Hashes are compared with :func:`hmac.compare_digest`.

    Caching: a verified key is remembered in memory for ``cache_ttl_s`` seconds, so a busy
    key costs one SHA-256 and a dict look-up instead of a SQLite read. :meth:`revoke`
    through this store drops the key from its cache at once; a revoke done by another
    process (another gateway replica, or ``meshllm keys revoke``) is seen here within
    ``cache_ttl_s``. Unknown and revoked keys are not cached, so they always reach SQLite.

    Thread-safe: one connection, used under a lock.
    """

    def __init__(
        self,
        path: Path,
        cache_ttl_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if cache_ttl_s < 0:
            raise ValueError(f"cache_ttl_s must not be negative, not {cache_ttl_s!r}")
        self.path = Path(path)
        self.cache_ttl_s = cache_ttl_s
        self._clock = clock
        self._cache: dict[str, _Cached] = {}
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            private_file(self.path), check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA busy_timeout = 5000")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute(
            """CREATE TABLE IF NOT EXISTS api_keys (
                key_id TEXT PRIMARY KEY,
                key_hash TEXT NOT NULL,
                tenant TEXT NOT NULL,
                roles TEXT NOT NULL,
                name TEXT NOT NULL DEFAULT '',
                rpm INTEGER,
                tpm INTEGER,
                created_at REAL NOT NULL,
                revoked_at REAL
            )"""
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._cache.clear()

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def create(
        self,
        tenant: str,
        roles: Iterable[str],
        name: str = "",
        rpm: int | None = None,
        tpm: int | None = None,
    ) -> tuple[KeyRecord, str]:
        """Make a new key for ``tenant`` with ``roles``.

        Returns:
            The key's record and the key itself, which is not stored and cannot be shown again.

        Raises:
            ValueError: naming the field (``tenant``, ``roles``, ``rpm``, ``tpm``) that is invalid.
        """
        validate_tenant(tenant)
        unique_roles = validate_roles(roles)
        _validate_limit("rpm", rpm)
        _validate_limit("tpm", tpm)
        created_at = time.time()
        with self._lock:
            while True:
                key_id = secrets.token_hex(6)
                key = f"{KEY_PREFIX}{key_id}-{secrets.token_urlsafe(_SECRET_BYTES)}"
                try:
                    self._db.execute(
                        "INSERT INTO api_keys"
                        " (key_id, key_hash, tenant, roles, name, rpm, tpm, created_at)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            key_id,
                            _hash_key(key),
                            tenant,
                            json.dumps(unique_roles),
                            name,
                            rpm,
                            tpm,
                            created_at,
                        ),
                    )
                except sqlite3.IntegrityError:  # a key id drawn twice: draw again
                    continue
                break
        record = KeyRecord(
            key_id=key_id,
            tenant=tenant,
            roles=unique_roles,
            name=name,
            rpm=rpm,
            tpm=tpm,
            created_at=datetime.fromtimestamp(created_at, UTC),
            revoked_at=None,
        )
        return record, key

    def revoke(self, key_id: str) -> bool:
        """Revoke a key. Returns False when no such key exists or it was already revoked."""
        with self._lock:
            self._cache.pop(key_id, None)
            cursor = self._db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                (time.time(), key_id),
            )
        return cursor.rowcount > 0

    def get(self, key_id: str) -> KeyRecord | None:
        """The record of ``key_id``, revoked or not; None when there is none."""
        with self._lock:
            row = self._db.execute(
                "SELECT key_id, tenant, roles, name, rpm, tpm, created_at, revoked_at"
                " FROM api_keys WHERE key_id = ?",
                (key_id,),
            ).fetchone()
        return None if row is None else self._record(row)

    def verify(self, key: str) -> Principal:
        """The caller that ``key`` belongs to.

        Raises:
            AuthError: "invalid API key" for a malformed, unknown or revoked key (the same
                message for each, so the answer tells a guesser nothing).
        """
        match = _KEY.fullmatch(key)
        if match is None:
            raise AuthError("invalid API key")
        key_id = match["key_id"]
        key_hash = _hash_key(key)
        now = self._clock()
        with self._lock:
            cached = self._cache.get(key_id)
            if cached is not None and cached.expires > now:
                if hmac.compare_digest(cached.key_hash, key_hash):
                    return cached.principal
                raise AuthError("invalid API key")
            row = self._db.execute(
                "SELECT key_id, tenant, roles, name, rpm, tpm, created_at, revoked_at, key_hash"
                " FROM api_keys WHERE key_id = ?",
                (key_id,),
            ).fetchone()
            if row is None or row[7] is not None or not hmac.compare_digest(row[8], key_hash):
                self._cache.pop(key_id, None)
                raise AuthError("invalid API key")
            principal = self._record(row).principal()
            if self.cache_ttl_s > 0:
                self._remember(key_id, _Cached(now + self.cache_ttl_s, key_hash, principal), now)
            return principal

    def list(self) -> builtins.list[KeyRecord]:
        """Every key, revoked ones included, oldest first; never their secrets."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key_id, tenant, roles, name, rpm, tpm, created_at, revoked_at"
                " FROM api_keys ORDER BY created_at, key_id"
            ).fetchall()
        return [self._record(row) for row in rows]

    def _remember(self, key_id: str, entry: _Cached, now: float) -> None:
        if len(self._cache) >= _MAX_CACHED:
            for stale in [k for k, v in self._cache.items() if v.expires <= now]:
                del self._cache[stale]
            if len(self._cache) >= _MAX_CACHED:
                self._cache.clear()
        self._cache[key_id] = entry

    @staticmethod
    def _record(row: tuple[Any, ...]) -> KeyRecord:
        return KeyRecord(
            key_id=row[0],
            tenant=row[1],
            roles=tuple(json.loads(row[2])),
            name=row[3],
            rpm=row[4],
            tpm=row[5],
            created_at=datetime.fromtimestamp(row[6], UTC),
            revoked_at=_timestamp(row[7]),
        )


class JwtVerifier:
    """Checks JWTs signed by one trusted issuer and turns them into principals.

    The signature, ``exp`` and ``iss`` are always checked (``exp``, ``iss`` and ``sub``
    must be present); ``aud`` when ``audience`` is set. Without ``audience``, a token that
    carries an ``aud`` claim is refused, since it was meant for someone else.

    Args:
        issuer: the expected ``iss``.
        key: the shared secret for HS256/384/512, or a PEM public key for the RS, PS, ES
            and EdDSA algorithms. One kind only: mixing them would let a public key be used
            as an HMAC secret.
        algorithms: the accepted ``alg`` values.
        audience: the expected ``aud``, if any.
        tenant_claim: the claim naming the tenant (required).
        roles_claim: the claim listing roles: a list, or a space-separated string. Absent:
            no roles, so the policy grants nothing.
        leeway_s: clock skew allowed on ``exp``, ``nbf`` and ``iat``.

    Raises:
        ValueError: naming ``algorithms`` or ``key`` when they are unusable.
    """

    def __init__(
        self,
        issuer: str,
        key: str,
        algorithms: builtins.list[str],
        audience: str | None = None,
        *,
        tenant_claim: str = "tenant",
        roles_claim: str = "roles",
        leeway_s: float = 30.0,
    ) -> None:
        if not issuer:
            raise ValueError("issuer must not be empty")
        if not algorithms:
            raise ValueError("algorithms must name at least one algorithm")
        unknown = set(algorithms) - _HMAC_ALGORITHMS - _PUBLIC_KEY_ALGORITHMS
        if unknown:
            supported = ", ".join(sorted(_HMAC_ALGORITHMS | _PUBLIC_KEY_ALGORITHMS))
            raise ValueError(f"algorithms: {sorted(unknown)} not supported; use {supported}")
        self.issuer = issuer
        self.algorithms = list(algorithms)
        self.audience = audience
        self.tenant_claim = tenant_claim
        self.roles_claim = roles_claim
        self.leeway_s = leeway_s
        self._key: Any
        if set(algorithms) <= _HMAC_ALGORITHMS:
            if "-----BEGIN" in key:
                raise ValueError("key: HS* algorithms need a shared secret, not a PEM key")
            if len(key.encode()) < _MIN_HMAC_SECRET_BYTES:
                raise ValueError(f"key: an HMAC secret needs {_MIN_HMAC_SECRET_BYTES}+ bytes")
            self._key = key
        elif set(algorithms) <= _PUBLIC_KEY_ALGORITHMS:
            try:
                self._key = load_pem_public_key(key.encode())
            except ValueError:
                raise ValueError(
                    f"key: algorithms {self.algorithms} need a PEM public key"
                    " ('-----BEGIN PUBLIC KEY-----' ...), and this one does not load"
                ) from None
        else:
            raise ValueError("algorithms: do not mix HS* with public-key algorithms")

    def verify(self, token: str) -> Principal:
        """The caller the token names.

        Raises:
            AuthError: the token is malformed, expired, not yet valid, badly signed, from
                another issuer or audience, or lacks a required claim.
        """
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self.algorithms,
                issuer=self.issuer,
                audience=self.audience,
                leeway=self.leeway_s,
                options={"require": ["exp", "iss", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("JWT has expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("JWT is not valid yet") from None
        except jwt.InvalidIssuerError:
            raise AuthError("JWT issuer is not trusted") from None
        except jwt.InvalidAudienceError:
            raise AuthError("JWT audience does not match") from None
        except jwt.InvalidSignatureError:
            raise AuthError("JWT signature is invalid") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError(f"JWT algorithm is not accepted; use {self.algorithms}") from None
        except jwt.MissingRequiredClaimError as error:
            raise AuthError(f"JWT lacks the required claim {error.claim!r}") from None
        except jwt.DecodeError:
            raise AuthError("malformed JWT") from None
        except jwt.InvalidTokenError:
            raise AuthError("invalid JWT") from None
        return Principal(
            # its own namespace: a token whose sub reads "key:..." never passes for an API key
            subject=f"jwt:{claims['sub']}",
            tenant=self._tenant(claims),
            roles=self._roles(claims),
            key_id=None,
            method="jwt",
        )

    def _tenant(self, claims: dict[str, Any]) -> str:
        tenant = claims.get(self.tenant_claim)
        if tenant is None:
            raise AuthError(f"JWT lacks the tenant claim {self.tenant_claim!r}")
        if not isinstance(tenant, str) or not _NAME.fullmatch(tenant):
            raise AuthError(f"JWT claim {self.tenant_claim!r} is not a valid tenant name")
        return tenant

    def _roles(self, claims: dict[str, Any]) -> tuple[str, ...]:
        roles = claims.get(self.roles_claim)
        if roles is None:
            return ()
        if isinstance(roles, str):
            roles = roles.split()
        if not isinstance(roles, list) or not all(isinstance(role, str) for role in roles):
            raise AuthError(f"JWT claim {self.roles_claim!r} must be a list of role names")
        return tuple(dict.fromkeys(roles))


class Authenticator:
    """Reads the ``Authorization`` header: ``Bearer mk-...`` is an API key, any other
    bearer token a JWT."""

    def __init__(self, keys: KeyStore, jwt: JwtVerifier | None = None) -> None:
        self.keys = keys
        self.jwt = jwt

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller, from the value of the ``Authorization`` header.

        Raises:
            AuthError: the header is missing, not a bearer token, or its credential is refused.
        """
        if authorization is None or not authorization.strip():
            raise AuthError("missing credentials: send Authorization: Bearer <API key>")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError("unsupported credentials: send Authorization: Bearer <API key>")
        if token.startswith(KEY_PREFIX):
            return self.keys.verify(token)
        if self.jwt is None:
            raise AuthError("JWT authentication is not configured")
        return self.jwt.verify(token)
