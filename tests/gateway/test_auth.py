"""API keys in SQLite, JWT verification, and the Authorization header."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from services.gateway.auth import Authenticator, AuthError, JwtVerifier, KeyStore, Principal

HS_SECRET = "a-shared-secret-of-at-least-32-bytes!!"
ISSUER = "https://idp.example.test/"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> Iterator[KeyStore]:
    with KeyStore(tmp_path / "keys.sqlite") as keys:
        yield keys


def test_created_key_verifies_to_its_principal(store: KeyStore) -> None:
    record, key = store.create("acme", ["user", "batch", "user"], name="ci", rpm=10, tpm=5000)
    assert re.fullmatch(r"mk-[0-9a-f]{12}-[A-Za-z0-9_-]{32}", key)
    assert key.startswith(f"mk-{record.key_id}-")
    assert record.roles == ("user", "batch")
    assert store.verify(key) == Principal(
        subject=f"key:{record.key_id}",
        tenant="acme",
        roles=("user", "batch"),
        key_id=record.key_id,
        method="api_key",
        rpm=10,
        tpm=5000,
    )


def test_keys_are_distinct_and_listed_without_secrets(store: KeyStore) -> None:
    (first, key_a), (second, key_b) = (
        store.create("acme", ["user"]),
        store.create("beta", ["admin"]),
    )
    assert key_a != key_b
    assert first.key_id != second.key_id
    listed = store.list()
    assert [record.key_id for record in listed] == [first.key_id, second.key_id]
    assert [record.tenant for record in listed] == ["acme", "beta"]
    for record, key in zip(listed, (key_a, key_b), strict=True):
        assert not record.revoked
        assert key[16:] not in repr(record.to_json())
        assert key[16:] not in repr(record)


def test_the_secret_is_not_stored(tmp_path: Path) -> None:
    path = tmp_path / "keys.sqlite"
    with KeyStore(path) as keys:
        keys.create("acme", ["user"])
        _, key = keys.create("acme", ["user"])
        keys.verify(key)
        on_disk = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    key_id, secret = key[3:15], key[16:]
    assert len(secret) == 32
    assert secret.encode() not in on_disk
    assert secret[:16].encode() not in on_disk
    assert key.encode() not in on_disk
    assert key_id.encode() in on_disk  # the key id is stored: the search did look


@pytest.mark.parametrize(
    "mangle",
    [
        lambda key: "",
        lambda key: "mk-",
        lambda key: key[:-1],
        lambda key: key + "x",
        lambda key: key + "\n",
        lambda key: key.upper(),
        lambda key: key[:-1] + ("A" if key[-1] != "A" else "B"),
        lambda key: key.replace("mk-", "sk-"),
        lambda key: "mk-000000000000-" + key[-32:],
    ],
    ids=[
        "empty",
        "prefix",
        "short",
        "long",
        "newline",
        "upper",
        "wrong-secret",
        "prefix-changed",
        "unknown-id",
    ],
)
def test_malformed_or_unknown_keys_are_refused(store: KeyStore, mangle: Any) -> None:
    _, key = store.create("acme", ["user"])
    store.verify(key)  # cached: the wrong secret must fail from the cache too
    with pytest.raises(AuthError, match=r"^invalid API key$") as refused:
        store.verify(mangle(key))
    assert key[-32:] not in str(refused.value)


def test_wrong_secret_is_refused_from_the_database_too(store: KeyStore) -> None:
    _, key = store.create("acme", ["user"])
    with pytest.raises(AuthError, match="invalid API key"):
        store.verify(key[:-1] + ("A" if key[-1] != "A" else "B"))
    assert store.verify(key).tenant == "acme"


def test_revoke_through_the_same_store_is_immediate(store: KeyStore) -> None:
    record, key = store.create("acme", ["user"])
    store.verify(key)
    assert store.revoke(record.key_id) is True
    with pytest.raises(AuthError, match="invalid API key"):
        store.verify(key)
    assert store.revoke(record.key_id) is False
    assert store.revoke("000000000000") is False
    listed = store.get(record.key_id)
    assert listed is not None
    assert listed.revoked
    assert listed.revoked_at is not None


def test_revoke_through_another_store_takes_effect_after_the_cache_ttl(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "keys.sqlite"
    with KeyStore(path, cache_ttl_s=5, clock=clock) as gateway, KeyStore(path) as admin:
        record, key = admin.create("acme", ["user"])
        assert gateway.verify(key).key_id == record.key_id
        assert admin.revoke(record.key_id)
        clock.now += 4.9
        assert gateway.verify(key).key_id == record.key_id  # still trusted from memory
        clock.now += 0.2
        with pytest.raises(AuthError, match="invalid API key"):
            gateway.verify(key)


def test_without_a_cache_every_verify_reads_the_database(tmp_path: Path) -> None:
    path = tmp_path / "keys.sqlite"
    with KeyStore(path, cache_ttl_s=0) as gateway, KeyStore(path) as admin:
        record, key = admin.create("acme", ["user"])
        gateway.verify(key)
        admin.revoke(record.key_id)
        with pytest.raises(AuthError):
            gateway.verify(key)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"tenant": "", "roles": ["user"]}, "tenant"),
        ({"tenant": "Acme", "roles": ["user"]}, "tenant"),
        ({"tenant": "-acme", "roles": ["user"]}, "tenant"),
        ({"tenant": "a" * 64, "roles": ["user"]}, "tenant"),
        ({"tenant": "acme", "roles": []}, "roles"),
        ({"tenant": "acme", "roles": ["user", "Bad Role"]}, "roles"),
        ({"tenant": "acme", "roles": ["user"], "rpm": 0}, "rpm"),
        ({"tenant": "acme", "roles": ["user"], "tpm": -5}, "tpm"),
    ],
)
def test_invalid_fields_are_named(store: KeyStore, kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}"):
        store.create(**kwargs)
    assert store.list() == []


def test_longest_valid_names_are_accepted(store: KeyStore) -> None:
    record, key = store.create("a" * 63, ["r_1-x"])
    assert store.verify(key).tenant == "a" * 63
    assert record.roles == ("r_1-x",)


# --------------------------------------------------------------------------- JWT


def _token(key: Any = HS_SECRET, algorithm: str = "HS256", **overrides: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": "alice",
        "iss": ISSUER,
        "exp": now + 300,
        "iat": now,
        "tenant": "acme",
        "roles": ["developer", "user"],
    }
    claims.update(overrides)
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, key, algorithm=algorithm)


@pytest.fixture
def hs_verifier() -> JwtVerifier:
    return JwtVerifier(ISSUER, HS_SECRET, ["HS256"], None)


def test_valid_jwt_gives_a_principal(hs_verifier: JwtVerifier) -> None:
    assert hs_verifier.verify(_token()) == Principal(
        subject="jwt:alice",
        tenant="acme",
        roles=("developer", "user"),
        key_id=None,
        method="jwt",
    )


def test_roles_may_be_a_space_separated_string_or_absent(hs_verifier: JwtVerifier) -> None:
    assert hs_verifier.verify(_token(roles="user batch")).roles == ("user", "batch")
    assert hs_verifier.verify(_token(roles=None)).roles == ()


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (lambda: _token(exp=int(time.time()) - 3600), "JWT has expired"),
        (lambda: _token(iss="https://evil.example.test/"), "JWT issuer is not trusted"),
        (lambda: _token(key="another-secret-of-at-least-32-bytes!!"), "JWT signature is invalid"),
        (lambda: _token(tenant=None), "JWT lacks the tenant claim 'tenant'"),
        (lambda: _token(tenant="Not A Tenant"), "JWT claim 'tenant' is not a valid tenant name"),
        (lambda: _token(exp=None), "JWT lacks the required claim 'exp'"),
        (lambda: _token(sub=None), "JWT lacks the required claim 'sub'"),
        (lambda: _token(nbf=int(time.time()) + 3600), "JWT is not valid yet"),
        (lambda: _token(aud="someone-else"), "JWT audience does not match"),
        (lambda: _token(roles=[1, 2]), "must be a list of role names"),
        (lambda: "not.a.jwt", "malformed JWT"),
        (lambda: jwt.encode({"sub": "x"}, "", algorithm="none"), "JWT algorithm is not accepted"),
    ],
    ids=[
        "expired",
        "wrong-issuer",
        "bad-signature",
        "missing-tenant",
        "bad-tenant",
        "no-exp",
        "no-sub",
        "not-yet-valid",
        "unexpected-audience",
        "bad-roles",
        "malformed",
        "alg-none",
    ],
)
def test_bad_jwts_are_refused_clearly(hs_verifier: JwtVerifier, token: Any, message: str) -> None:
    with pytest.raises(AuthError, match=re.escape(message)):
        hs_verifier.verify(token())


def test_audience_is_checked_when_configured() -> None:
    verifier = JwtVerifier(ISSUER, HS_SECRET, ["HS256"], "meshllm")
    assert verifier.verify(_token(aud="meshllm")).subject == "jwt:alice"
    with pytest.raises(AuthError, match="audience"):
        verifier.verify(_token(aud="other"))
    with pytest.raises(AuthError, match="required claim 'aud'"):
        verifier.verify(_token())


def test_custom_claim_names() -> None:
    verifier = JwtVerifier(ISSUER, HS_SECRET, ["HS256"], tenant_claim="org", roles_claim="groups")
    principal = verifier.verify(_token(tenant=None, roles=None, org="beta", groups=["admin"]))
    assert (principal.tenant, principal.roles) == ("beta", ("admin",))


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[Any, str]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public_pem


def test_rs256_with_a_pem_public_key(rsa_keys: tuple[Any, str]) -> None:
    private, public_pem = rsa_keys
    verifier = JwtVerifier(ISSUER, public_pem, ["RS256"], None)
    assert verifier.verify(_token(key=private, algorithm="RS256")).tenant == "acme"
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(AuthError, match="JWT signature is invalid"):
        verifier.verify(_token(key=other, algorithm="RS256"))
    # the public key used as an HMAC secret (algorithm confusion) is refused
    with pytest.raises(AuthError, match="JWT algorithm is not accepted"):
        verifier.verify(_token(key=HS_SECRET, algorithm="HS256"))


@pytest.mark.parametrize(
    ("key", "algorithms", "message"),
    [
        ("short", ["HS256"], "32"),
        ("-----BEGIN PUBLIC KEY-----" + "x" * 40, ["HS256"], "not a PEM key"),
        (HS_SECRET, ["RS256"], "PEM public key"),
        (HS_SECRET, ["HS256", "RS256"], "do not mix"),
        (HS_SECRET, ["none"], "not supported"),
        (HS_SECRET, [], "at least one"),
    ],
)
def test_unusable_verifier_configuration_is_refused(
    key: str, algorithms: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        JwtVerifier(ISSUER, key, algorithms)


# --------------------------------------------------------------------------- the header


def test_authenticator_picks_keys_or_jwt(store: KeyStore, hs_verifier: JwtVerifier) -> None:
    record, key = store.create("acme", ["user"])
    both = Authenticator(store, hs_verifier)
    assert both.authenticate(f"Bearer {key}").key_id == record.key_id
    assert both.authenticate(f"bearer   {key} ").key_id == record.key_id
    assert both.authenticate(f"Bearer {_token()}").method == "jwt"
    keys_only = Authenticator(store, None)
    with pytest.raises(AuthError, match=r"^JWT authentication is not configured$"):
        keys_only.authenticate(f"Bearer {_token()}")
    with pytest.raises(AuthError, match="invalid API key"):
        keys_only.authenticate("Bearer mk-nonsense")


@pytest.mark.parametrize("header", [None, "", "   "])
def test_missing_credentials(store: KeyStore, header: str | None) -> None:
    with pytest.raises(AuthError, match=r"^missing credentials: send Authorization: Bearer"):
        Authenticator(store, None).authenticate(header)


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer   ", "mk-abc"])
def test_non_bearer_credentials(store: KeyStore, header: str) -> None:
    with pytest.raises(AuthError, match="Bearer"):
        Authenticator(store, None).authenticate(header)


def test_a_jwt_cannot_pass_for_an_api_key_in_the_audit(hs_verifier: JwtVerifier) -> None:
    """Audit records name ``principal.subject``: a token's sub is kept in its own namespace."""
    principal = hs_verifier.verify(_token(sub="key:0123456789ab"))
    assert principal.subject == "jwt:key:0123456789ab"
    assert principal.key_id is None
