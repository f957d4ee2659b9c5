"""What a detector reports: the kinds of PII and one finding."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class PiiType(StrEnum):
    ID_CARD = "id_card"
    PHONE = "phone"
    BANK_CARD = "bank_card"
    EMAIL = "email"
    IP_ADDRESS = "ip_address"
    PASSPORT = "passport"
    NAME = "name"
    ADDRESS = "address"

    @property
    def label(self) -> str:
        """The upper-case name used in replacement labels, e.g. ``ID_CARD``."""
        return self.value.upper()


STRUCTURED_TYPES = frozenset(
    {
        PiiType.ID_CARD,
        PiiType.PHONE,
        PiiType.BANK_CARD,
        PiiType.EMAIL,
        PiiType.IP_ADDRESS,
        PiiType.PASSPORT,
    }
)
CONTEXTUAL_TYPES = frozenset({PiiType.NAME, PiiType.ADDRESS})


@dataclass(frozen=True, slots=True)
class Finding:
    """One detected value: ``text[start:end] == value``.

    ``score`` is the detector's confidence in [0, 1]. The value is left out of ``repr`` so
    that a finding printed or logged by mistake does not leak it.
    """

    type: PiiType
    start: int
    end: int
    score: float
    value: str = field(repr=False)
