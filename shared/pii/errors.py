"""Errors of the PII library."""

from __future__ import annotations


class PiiConfigError(Exception):
    """A PII policy or key setting is missing or invalid; the message names the setting.

    Deliberately not a ``ValueError``: pydantic would wrap one in a ``ValidationError``
    that repeats the settings' input, secret keys included.
    """


class PiiTokenError(ValueError):
    """A token could not be reversed: wrong key or tenant, tampered, or not reversible."""
