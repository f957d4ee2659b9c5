"""Per-tenant PII settings: a policy per consumer purpose, per tenant, and the keys.

Services embed :class:`TenantPiiSettings` as the ``pii`` field of their settings, so that
``MESHLLM_PII__KEYS__ACME=...`` sets the key named ``acme`` and
``MESHLLM_PII__TENANTS='{"acme": {"feedback": {"default_mode": "tokenize", "key": "acme"}}}'``
overrides one purpose of one tenant. A policy that tokenizes without its key stops start-up.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, model_validator

from shared.pii.errors import PiiConfigError
from shared.pii.keys import MIN_SECRET_BYTES, PiiKey
from shared.pii.policy import PiiMode, PiiPolicy, Purpose
from shared.pii.redact import Redactor

SETTINGS_FIELD = "pii"  # where services put TenantPiiSettings; named in configuration errors


class PurposePolicies(BaseModel):
    """One policy per purpose. Audit records stay intact unless a policy enables redaction."""

    model_config = ConfigDict(extra="forbid")

    logs: PiiPolicy = PiiPolicy()
    audit: PiiPolicy = PiiPolicy(enabled=False)
    feedback: PiiPolicy = PiiPolicy()
    training: PiiPolicy = PiiPolicy(default_mode=PiiMode.DROP)

    def get(self, purpose: Purpose) -> PiiPolicy:
        policy: PiiPolicy = getattr(self, purpose.value)
        return policy


class TenantPiiSettings(BaseModel):
    """The policies of every tenant, a default for the others, and the keys they name."""

    model_config = ConfigDict(extra="forbid")

    default: PurposePolicies = PurposePolicies()
    tenants: dict[str, dict[Purpose, PiiPolicy]] = Field(
        default_factory=dict,
        description="Per tenant, the purposes whose policy differs from the default's.",
    )
    keys: dict[str, SecretStr] = Field(
        default_factory=dict, description="Named secrets (>= 16 bytes) that policies tokenize with."
    )
    _redactors: dict[tuple[str, Purpose], Redactor] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _tokenizing_policies_have_keys(self) -> TenantPiiSettings:
        placed: list[tuple[str, PiiPolicy]] = [
            (f"default.{purpose.value}", self.default.get(purpose)) for purpose in Purpose
        ]
        placed += [
            (f"tenants.{tenant}.{purpose.value}", policy)
            for tenant, overrides in self.tenants.items()
            for purpose, policy in overrides.items()
        ]
        for where, policy in placed:
            if policy.tokenizes:
                self._check_key(where, policy.key)
        return self

    def _check_key(self, where: str, name: str | None) -> None:
        if name is None:
            raise PiiConfigError(
                f"{SETTINGS_FIELD}.{where} tokenizes but names no key: "
                f"set {SETTINGS_FIELD}.{where}.key to an entry of {SETTINGS_FIELD}.keys"
            )
        secret = self.keys.get(name)
        if secret is None:
            raise PiiConfigError(
                f"{SETTINGS_FIELD}.{where} tokenizes with key {name!r}, which is not set: "
                f"set {SETTINGS_FIELD}.keys.{name} "
                f"(MESHLLM_{SETTINGS_FIELD.upper()}__KEYS__{name.upper()})"
            )
        if len(secret.get_secret_value().encode()) < MIN_SECRET_BYTES:
            raise PiiConfigError(
                f"{SETTINGS_FIELD}.keys.{name} is shorter than {MIN_SECRET_BYTES} bytes"
            )

    def policy_for(self, tenant: str | None, purpose: Purpose | str) -> PiiPolicy:
        """The policy for ``tenant``'s text going to ``purpose`` (the default one if unset).

        Raises:
            ValueError: ``purpose`` is not one of logs, audit, feedback, training.
        """
        purpose = Purpose(purpose)
        override = self.tenants.get(tenant or "", {}).get(purpose)
        return override if override is not None else self.default.get(purpose)

    def key_for(self, tenant: str | None, purpose: Purpose | str) -> PiiKey | None:
        """The tenant's key for ``purpose``'s policy; None when that policy names none.

        Raises:
            PiiConfigError: the policy names a key that is not set.
        """
        policy = self.policy_for(tenant, purpose)
        if policy.key is None:
            return None
        secret = self.keys.get(policy.key)
        if secret is None:
            raise PiiConfigError(f"{SETTINGS_FIELD}.keys.{policy.key} is not set")
        return PiiKey(
            secret.get_secret_value(),
            tenant=tenant or "",
            setting=f"{SETTINGS_FIELD}.keys.{policy.key}",
        )

    def redactor(self, tenant: str | None, purpose: Purpose | str) -> Redactor:
        """The redactor that applies ``policy_for(tenant, purpose)`` with its key; cached."""
        purpose = Purpose(purpose)
        cached = self._redactors.get((tenant or "", purpose))
        if cached is None:
            policy = self.policy_for(tenant, purpose)
            cached = Redactor(policy, self.key_for(tenant, purpose))
            self._redactors[(tenant or "", purpose)] = cached
        return cached
