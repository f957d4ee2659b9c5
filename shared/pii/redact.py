"""Replacing detected PII with type-labelled masks, tokens or bare labels.

Replacements are bracketed and carry the type: ``[PHONE:***5678]`` (mask),
``[PHONE:tok_…]`` (keyed hash), ``[PHONE:enc_…]`` (reversible) and ``[PHONE]`` (drop).
Values are normalized before tokenizing (``138-1234-5678`` and ``+86 13812345678`` give
the same token), so a reversed token gives the normalized value, not its original spelling.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from shared.pii.detect import detect
from shared.pii.errors import PiiConfigError, PiiTokenError
from shared.pii.keys import PiiKey
from shared.pii.policy import PiiMode, PiiPolicy
from shared.pii.text import to_halfwidth
from shared.pii.types import Finding, PiiType

T = TypeVar("T")

HASH_PREFIX = "tok_"
CIPHER_PREFIX = "enc_"
_CIPHER_LABEL = re.compile(
    r"\[(?P<label>[A-Z_]+):" + CIPHER_PREFIX + r"(?P<token>[A-Za-z0-9_-]+)\]"
)
_NOT_DIGIT = re.compile(r"[^0-9]")
_SEPARATORS = re.compile(r"[\s-]")
_DIGIT_TYPES = frozenset({PiiType.ID_CARD, PiiType.PHONE, PiiType.BANK_CARD, PiiType.PASSPORT})


@dataclass(frozen=True, slots=True)
class RedactionResult:
    """Redacted text and how many values of each type were replaced; never the values."""

    text: str
    counts: Mapping[PiiType, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True, slots=True)
class RedactedData(Generic[T]):
    """A redacted copy of a JSON-like structure and the counts over all its strings."""

    value: T
    counts: Mapping[PiiType, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def normalize(pii_type: PiiType, value: str) -> str:
    """The canonical spelling of a value, so that one value gives one token."""
    value = to_halfwidth(value).strip()
    if pii_type is PiiType.PHONE:
        return _NOT_DIGIT.sub("", value)[-11:]
    if pii_type is PiiType.BANK_CARD:
        return _NOT_DIGIT.sub("", value)
    if pii_type in (PiiType.ID_CARD, PiiType.PASSPORT):
        return _SEPARATORS.sub("", value).upper()
    if pii_type is PiiType.EMAIL:
        return value.lower()
    if pii_type is PiiType.IP_ADDRESS:
        return str(ipaddress.ip_address(value))
    return " ".join(value.split())


def mask(pii_type: PiiType, value: str, visible: int = 4) -> str:
    """A partial mask that keeps enough to recognise a value, not to recover it.

    Numbers keep their last ``visible`` characters, emails the first letter and the
    domain, IPv4 addresses the first two octets (IPv6: the first two groups), names the
    first character; addresses keep nothing.
    """
    if pii_type is PiiType.EMAIL:
        local, _, domain = value.rpartition("@")
        return f"{local[:1]}***@{domain}"
    if pii_type is PiiType.IP_ADDRESS:
        address = ipaddress.ip_address(normalize(pii_type, value))
        if address.version == 4:
            return ".".join(str(address).split(".")[:2]) + ".*.*"
        return ":".join(address.exploded.split(":")[:2]) + ":*"
    if pii_type is PiiType.NAME:
        return value[:1] + "***"
    if pii_type in _DIGIT_TYPES and visible:
        return "***" + normalize(pii_type, value)[-visible:]
    return "***"


class Redactor:
    """Applies one policy, with the key it tokenizes with.

    Raises:
        PiiConfigError: the policy tokenizes and no key was given.
    """

    def __init__(self, policy: PiiPolicy, key: PiiKey | None = None) -> None:
        if policy.tokenizes and key is None:
            raise PiiConfigError(
                "the PII policy tokenizes but no key was given: set the policy's `key` to "
                "an entry of the PII settings' `keys`"
            )
        self.policy = policy
        self._key = key

    def replacement(self, finding: Finding) -> str:
        """The label that takes ``finding``'s place."""
        pii_type = finding.type
        mode = self.policy.mode_for(pii_type)
        if mode is PiiMode.DROP:
            return f"[{pii_type.label}]"
        if mode is PiiMode.MASK:
            return f"[{pii_type.label}:{mask(pii_type, finding.value, self.policy.mask_visible)}]"
        key = cast(PiiKey, self._key)  # checked in __init__
        value = normalize(pii_type, finding.value)
        if self.policy.reversible:
            return f"[{pii_type.label}:{CIPHER_PREFIX}{key.encrypt(pii_type, value)}]"
        return f"[{pii_type.label}:{HASH_PREFIX}{key.token(pii_type, value)}]"

    def redact(self, text: str) -> RedactionResult:
        """``text`` with every enabled PII type replaced, and the counts per type."""
        if not self.policy.enabled or not text:
            return RedactionResult(text, {})
        findings = detect(text, self.policy.types, min_score=self.policy.min_score)
        if not findings:
            return RedactionResult(text, {})
        parts: list[str] = []
        position = 0
        for finding in findings:
            parts += (text[position : finding.start], self.replacement(finding))
            position = finding.end
        parts.append(text[position:])
        return RedactionResult("".join(parts), dict(Counter(f.type for f in findings)))

    def redact_data(
        self, data: T, *, skip_keys: Collection[str] = (), stringify_objects: bool = False
    ) -> RedactedData[T]:
        """A redacted copy of a JSON-like structure of dicts, lists and tuples.

        Strings are redacted wherever they are; dict keys are kept as they are. An int whose
        digits are PII (a phone number stored as a number) becomes its redacted string.

        Args:
            data: the structure; it is not modified.
            skip_keys: dict keys whose values are copied untouched at any depth
                (signatures, hashes, ids that only look like PII).
            stringify_objects: also redact other objects through ``str()``, replacing
                them by the redacted string when they hold PII (for log values).
        """
        counts: Counter[PiiType] = Counter()
        skip = frozenset(skip_keys)

        def walk(value: Any) -> Any:
            if isinstance(value, str):
                result = self.redact(value)
                counts.update(result.counts)
                return result.text
            if isinstance(value, dict):
                return {k: v if k in skip else walk(v) for k, v in value.items()}
            if isinstance(value, list | tuple):
                return type(value)(walk(item) for item in value)
            if value is None or isinstance(value, bool | float):
                return value
            if isinstance(value, int) or stringify_objects:
                result = self.redact(str(value))
                counts.update(result.counts)
                return result.text if result.counts else value
            return value

        if not self.policy.enabled:
            return RedactedData(data, {})
        return RedactedData(cast(T, walk(data)), dict(counts))


def redact(text: str, policy: PiiPolicy, key: PiiKey | None = None) -> RedactionResult:
    """Redact ``text`` by ``policy``; ``key`` is needed when the policy tokenizes."""
    return Redactor(policy, key).redact(text)


def redact_data(
    data: T, policy: PiiPolicy, key: PiiKey | None = None, *, skip_keys: Collection[str] = ()
) -> RedactedData[T]:
    """Redact the strings of a JSON-like structure; see :meth:`Redactor.redact_data`."""
    return Redactor(policy, key).redact_data(data, skip_keys=skip_keys)


def reveal(text: str, key: PiiKey, *, strict: bool = True) -> str:
    """``text`` with every reversible token (``[PHONE:enc_…]``) replaced by its value.

    Args:
        text: redacted text.
        key: the key of the tenant the text was redacted for.
        strict: raise on a token this key cannot reverse; when False, leave it in place
            (text written by users may hold look-alike tokens).

    Raises:
        PiiTokenError: strict, and a token was not made with this key and tenant, or was
            altered.
    """

    def value(match: re.Match[str]) -> str:
        try:
            return key.decrypt(PiiType(match["label"].lower()), match["token"])
        except PiiTokenError:
            if strict:
                raise
            return match.group()
        except ValueError:  # not a PII type label
            return match.group()

    return _CIPHER_LABEL.sub(value, text)
