"""A structlog processor that redacts PII in every value of a log event.

Each event is redacted by its tenant's ``logs`` policy (the ``tenant`` key of the event,
bound with ``structlog.contextvars`` or passed to the call), or the default one.
"""

from __future__ import annotations

from collections.abc import Collection, MutableMapping
from typing import Any

from shared.pii.policy import Purpose
from shared.pii.settings import TenantPiiSettings

# Keys that structlog and shared.logging add, which never hold PII but can look like it
# (trace ids are hex, timestamps are digits).
DEFAULT_SKIP_KEYS = frozenset(
    {"timestamp", "level", "logger", "service", "trace_id", "span_id", "request_id", "event_id"}
)


class PiiLogProcessor:
    """structlog processor: ``event_dict`` with PII redacted in its values, nested ones too.

    Args:
        settings: the PII settings; the default ones (mask everything) when None.
        tenant_key: the event key that names the tenant whose policy applies.
        skip_keys: event keys (at any depth) left untouched.
    """

    def __init__(
        self,
        settings: TenantPiiSettings | None = None,
        *,
        tenant_key: str = "tenant",
        skip_keys: Collection[str] = DEFAULT_SKIP_KEYS,
    ) -> None:
        self.settings = settings if settings is not None else TenantPiiSettings()
        self.tenant_key = tenant_key
        self.skip_keys = frozenset(skip_keys) | {tenant_key}

    def __call__(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        tenant = event_dict.get(self.tenant_key)
        redactor = self.settings.redactor(tenant if isinstance(tenant, str) else None, Purpose.LOGS)
        if not redactor.policy.enabled:
            return event_dict
        for key, value in event_dict.items():
            if key not in self.skip_keys:
                event_dict[key] = redactor.redact_data(
                    value, skip_keys=self.skip_keys, stringify_objects=True
                ).value
        return event_dict
