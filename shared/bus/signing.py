"""Signed events: a consumer can tell an event of the mesh's own services from one that
any other Kafka client wrote, whatever tenant its envelope names.

Each producer of the mesh adds ``meshllm-signature``: the HMAC-SHA256, under the mesh's
event key, of the topic, the message type and the serialized event. A subscriber with
``MESHLLM_BUS__REQUIRE_SIGNED=true`` dead-letters (reason ``unverified``) every enveloped
event whose signature is missing or wrong before its handler sees it, so a tenant, user or
ACL group in an envelope or body is one a mesh service wrote. Kafka ACLs (who may write a
topic at all) are the cluster's part; this is the part that holds when a topic is shared
with other systems.

The key: ``MESHLLM_BUS__SIGNING_KEY_FILE`` (64 hex digits, 0600), else
``<tokens dir>/events.key``, which ``meshllm up`` and ``meshllm service-tokens`` make. A
producer without a key sends unsigned events; a subscriber that requires signatures and has
no key is a start-up error naming the setting.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from shared.settings import MeshSettings, SettingsError

SIGNATURE_HEADER = "meshllm-signature"
KEY_FILE = "events.key"
KEY_SETTING = "MESHLLM_BUS__SIGNING_KEY_FILE"


class UnverifiedEvent(ValueError):
    """An event without a valid signature, where one is required."""


class EventSigner:
    """Signs and verifies events under one mesh key (HMAC-SHA256)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("the event signing key must have at least 256 bits")
        self._key = key

    def signature(self, topic: str, type_name: bytes, value: bytes) -> bytes:
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        # the topic and type are signed too: a signed event replayed on another topic fails
        mac.update(topic.encode() + b"\0" + type_name + b"\0")
        mac.update(value)
        return mac.hexdigest().encode()

    def verify(self, topic: str, type_name: bytes, value: bytes, signature: bytes | None) -> None:
        """Raises:
        UnverifiedEvent: ``signature`` is missing or not this key's for the event.
        """
        if signature is None:
            raise UnverifiedEvent(f"unsigned event on {topic} (this consumer requires signatures)")
        if not hmac.compare_digest(signature, self.signature(topic, type_name, value)):
            raise UnverifiedEvent(f"forged or altered event on {topic}: its signature is wrong")


def key_path(settings: MeshSettings) -> Path:
    from shared.service_auth import tokens_dir

    configured = settings.bus.signing_key_file
    return configured if configured is not None else tokens_dir(settings) / KEY_FILE


def ensure_key(path: Path) -> None:
    """Make the mesh's event key at ``path`` (0600) unless it exists; safe to race."""
    from shared.service_auth import write_new

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        write_new(path, secrets.token_hex(32))


def load_signer(settings: MeshSettings, *, required: bool = False) -> EventSigner | None:
    """The mesh's signer, or None where there is no key and ``required`` is false.

    Raises:
        SettingsError: a key is required but missing, or it is malformed; names the setting.
    """
    path = key_path(settings)
    if not path.exists():
        if required:
            raise SettingsError(
                f"{KEY_SETTING}: MESHLLM_BUS__REQUIRE_SIGNED is on but there is no event key "
                f"at {path} (`meshllm service-tokens DIR` makes one)"
            )
        return None
    text = path.read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 32:
        raise SettingsError(f"{KEY_SETTING}: {path} must hold at least 64 hex digits")
    return EventSigner(key)
