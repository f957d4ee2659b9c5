"""How one consumer redacts: the modes, the purposes, and a policy."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from shared.pii.types import PiiType


class PiiMode(StrEnum):
    MASK = "mask"  # [PHONE:***5678]: type and a few characters stay readable
    TOKENIZE = "tokenize"  # [PHONE:tok_…] (keyed hash) or [PHONE:enc_…] (reversible)
    DROP = "drop"  # [PHONE]: only the type stays


class Purpose(StrEnum):
    """Where redacted text goes; each consumer asks for its own policy."""

    LOGS = "logs"
    AUDIT = "audit"
    FEEDBACK = "feedback"
    TRAINING = "training"


class PiiPolicy(BaseModel):
    """How one consumer redacts one tenant's text."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(True, description="False: text passes untouched.")
    types: frozenset[PiiType] = Field(
        default_factory=lambda: frozenset(PiiType), description="The PII types redacted."
    )
    default_mode: PiiMode = PiiMode.MASK
    modes: dict[PiiType, PiiMode] = Field(
        default_factory=dict, description="Per-type modes that override default_mode."
    )
    reversible: bool = Field(
        False,
        description="Tokenize with AES-SIV (the key holder can reverse) instead of HMAC-SHA256.",
    )
    key: str | None = Field(
        None, description="Name of the entry of TenantPiiSettings.keys used to tokenize."
    )
    mask_visible: int = Field(4, ge=0, le=8, description="Trailing characters a mask keeps.")
    min_score: float = Field(0.5, ge=0.0, le=1.0, description="Detector confidence needed.")

    def mode_for(self, pii_type: PiiType) -> PiiMode:
        return self.modes.get(pii_type, self.default_mode)

    @property
    def tokenizes(self) -> bool:
        """Whether some enabled type is tokenized, so that a key is needed."""
        return self.enabled and any(self.mode_for(t) is PiiMode.TOKENIZE for t in self.types)
