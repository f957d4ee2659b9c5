"""Which evaluator runs the access policy; a service nests these as its ``policy`` settings.

Examples::

    MESHLLM_POLICY__ENGINE=embedded                 # regorus, in process (the default)
    MESHLLM_POLICY__ENGINE=opa
    MESHLLM_POLICY__OPA_URL=http://opa:8181
    MESHLLM_POLICY__OPA_TOKEN=...                    # if the server wants a bearer token
    MESHLLM_POLICY__OPA_PUSH=false                   # the server loads bundles itself
"""

from __future__ import annotations

from enum import StrEnum
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, ValidationInfo, field_validator

DEFAULT_PORT = 8181


def parse_opa_url(url: str) -> tuple[bool, str, int]:
    """``(tls, host, port)`` of an OPA server's base URL (``http://opa:8181``).

    Raises:
        ValueError: the URL is not http(s)://host[:port] with no path.
    """
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// URL with a host")
    if parts.path not in {"", "/"} or parts.query or parts.fragment:
        raise ValueError(f"{url!r}: give the server's base URL, without a path")
    try:
        port = parts.port
    except ValueError as error:
        raise ValueError(f"{url!r}: {error}") from None
    return parts.scheme == "https", parts.hostname, port or DEFAULT_PORT


class PolicyEngine(StrEnum):
    EMBEDDED = "embedded"
    OPA = "opa"


class PolicySettings(BaseModel):
    """The evaluator of the access policy and, for ``opa``, how to reach the server."""

    engine: PolicyEngine = Field(
        PolicyEngine.EMBEDDED,
        description="`embedded`: regorus in process; `opa`: an OPA server over its REST API.",
    )
    opa_url: str | None = Field(
        None, validate_default=True, description="The OPA server, http(s)://host[:port]."
    )
    opa_token: SecretStr | None = Field(None, description="A bearer token for the OPA server.")
    opa_timeout_s: float = Field(1.0, gt=0, le=30, description="One call to the OPA server.")
    opa_push: bool = Field(
        True,
        description="Load policies/ into the OPA server at start; false when it loads "
        "bundles itself.",
    )

    @field_validator("opa_url")
    @classmethod
    def _url_for_opa(cls, url: str | None, info: ValidationInfo) -> str | None:
        if url is None:
            if info.data.get("engine") is PolicyEngine.OPA:
                raise ValueError("MESHLLM_POLICY__OPA_URL must be set when the engine is opa")
            return None
        parse_opa_url(url)
        return url
