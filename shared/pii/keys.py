"""Per-tenant key material: keyed-hash tokens and deterministic authenticated encryption.

One secret setting yields two independent keys through HKDF-SHA256, each bound to the
tenant: an HMAC-SHA256 key for one-way tokens and an AES-SIV key for reversible ones. The
tenant is part of the derivation, so two tenants never share a token even when they share
a secret, and only a holder of the secret *and* the tenant id can reverse a token.

Keyed-hash tokens are pseudonyms, not anonymisation: whoever holds the secret can hash every
mobile number (a few billion) and match. Guard the secret as closely as the reversible key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shared.pii.errors import PiiConfigError, PiiTokenError
from shared.pii.types import PiiType

MIN_SECRET_BYTES = 16
TOKEN_HEX_CHARS = 20  # 80 bits of the HMAC: collisions stay unlikely across billions of values


def _derive(secret: bytes, tenant: str, purpose: str, length: int) -> bytes:
    info = f"meshllm-pii/v1/{purpose}/{tenant}".encode()
    return HKDF(algorithm=SHA256(), length=length, salt=None, info=info).derive(secret)


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class PiiKey:
    """The token keys of one tenant, derived from a secret that is never shown.

    Args:
        secret: the secret setting's value, at least 16 bytes (32 random bytes advised:
            ``python -c "import secrets; print(secrets.token_urlsafe(32))"``).
        tenant: the tenant the tokens belong to; "" for text that belongs to no tenant.
        setting: the setting the secret came from, named in errors.

    Raises:
        PiiConfigError: the secret is too short.
    """

    __slots__ = ("_hmac_key", "_siv", "tenant")

    def __init__(self, secret: str | bytes, *, tenant: str, setting: str = "key") -> None:
        raw = secret.encode() if isinstance(secret, str) else secret
        if len(raw) < MIN_SECRET_BYTES:
            raise PiiConfigError(
                f"{setting}: a PII key needs at least {MIN_SECRET_BYTES} bytes "
                f"(got {len(raw)}); use 32 random bytes"
            )
        self.tenant = tenant
        self._hmac_key = _derive(raw, tenant, "hmac", 32)
        self._siv = AESSIV(_derive(raw, tenant, "aes-siv", 64))

    def __repr__(self) -> str:
        return f"PiiKey(tenant={self.tenant!r})"

    def token(self, pii_type: PiiType, value: str) -> str:
        """A one-way token: the same ``value`` of a type always gives the same token."""
        message = f"{pii_type.value}\x00{value}".encode()
        digest = hmac.new(self._hmac_key, message, hashlib.sha256).hexdigest()
        return digest[:TOKEN_HEX_CHARS]

    def encrypt(self, pii_type: PiiType, value: str) -> str:
        """A reversible token: deterministic, and authenticated with the type."""
        return _b64encode(self._siv.encrypt(value.encode(), [pii_type.value.encode()]))

    def decrypt(self, pii_type: PiiType, token: str) -> str:
        """The value behind an :meth:`encrypt` token.

        Raises:
            PiiTokenError: the token was made with another key or tenant, for another
                type, or altered.
        """
        try:
            plain = self._siv.decrypt(_b64decode(token), [pii_type.value.encode()])
        except (InvalidTag, ValueError, binascii.Error):
            raise PiiTokenError(
                f"cannot reverse a {pii_type.label} token: wrong key or tenant, or altered"
            ) from None
        return plain.decode()
