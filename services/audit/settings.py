"""Settings of the audit service (``MESHLLM_`` prefix, nested with ``__``).

Examples::

    MESHLLM_AUDIT_STORE=opensearch                    # unset: sqlite (embedded), else opensearch
    MESHLLM_AUDIT_DB=/var/lib/meshllm/audit.sqlite    # unset: <data_dir>/audit/audit.sqlite
    MESHLLM_AUDIT_SIGNING_KEY=/etc/meshllm/audit-signing-key.pem
                                                      # unset: <data_dir>/audit/signing-key.pem
    MESHLLM_OPENSEARCH__HOSTS='["https://opensearch:9200"]'
    MESHLLM_RETENTION_DAYS='{"acme": 90, "globex": 365}'
    MESHLLM_DEFAULT_RETENTION_DAYS=400                # unset: keep content forever
    MESHLLM_AUDIT_API_PORT=8090                       # the query and proof API
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator

from services.audit.records import MAX_PAGE_SIZE
from shared.settings import MeshSettings, Mode


class OpenSearchSettings(BaseModel):
    hosts: list[str] = Field(
        default_factory=lambda: ["http://127.0.0.1:9200"],
        min_length=1,
        description="OpenSearch node URLs.",
    )
    index_prefix: str = Field(
        "meshllm-audit",
        pattern=r"^[a-z0-9][a-z0-9_-]{0,100}$",
        description="Indices are <prefix>-records, -journal, -checkpoints, -purges, -meta.",
    )
    username: str | None = None
    password: SecretStr | None = None
    verify_certs: bool = True

    @field_validator("hosts")
    @classmethod
    def _urls(cls, hosts: list[str]) -> list[str]:
        for url in hosts:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"OpenSearch host {url!r} is not an http(s) URL")
        return hosts


class AuditSettings(MeshSettings):
    service_name: str = "audit"
    audit_api_host: str = Field("127.0.0.1", description="Where the query and proof API listens.")
    audit_api_port: int = Field(8090, ge=0, le=65535, description="0 picks a free port.")
    audit_store: Literal["sqlite", "opensearch"] | None = Field(
        None, description="The back end; unset: sqlite in embedded mode, opensearch in cluster."
    )
    audit_db: Path | None = Field(
        None, description="The SQLite store; unset: <data_dir>/audit/audit.sqlite."
    )
    audit_signing_key: Path | None = Field(
        None,
        description="The Ed25519 checkpoint signing key (PEM, 0600; made on first use); "
        "unset: <data_dir>/audit/signing-key.pem.",
    )
    opensearch: OpenSearchSettings = OpenSearchSettings()
    retention_days: dict[str, int] = Field(
        default_factory=dict, description="Days each tenant's record content is kept."
    )
    default_retention_days: int | None = Field(
        None, ge=1, description="Days for tenants not in retention_days; unset: forever."
    )
    checkpoint_interval_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="Sign a checkpoint at most this often while records arrive. With only the "
        "public key, a verifier names a tampered range no wider than the records between two "
        "checkpoints; each checkpoint is one row kept forever.",
    )
    max_page_size: int = Field(MAX_PAGE_SIZE, ge=1, le=MAX_PAGE_SIZE)

    @field_validator("retention_days")
    @classmethod
    def _positive_days(cls, days: dict[str, int]) -> dict[str, int]:
        for tenant, value in days.items():
            if value < 1:
                raise ValueError(f"retention of tenant {tenant!r} must be >= 1 day, not {value}")
        return days

    @property
    def store_kind(self) -> Literal["sqlite", "opensearch"]:
        if self.audit_store is not None:
            return self.audit_store
        return "sqlite" if self.mode is Mode.EMBEDDED else "opensearch"

    @property
    def db_path(self) -> Path:
        return (
            self.audit_db if self.audit_db is not None else self.data_dir / "audit" / "audit.sqlite"
        )

    @property
    def signing_key_path(self) -> Path:
        if self.audit_signing_key is not None:
            return self.audit_signing_key
        return self.data_dir / "audit" / "signing-key.pem"
