"""Settings of the feedback service (``MESHLLM_`` prefix, nested with ``__``).

Examples::

    MESHLLM_FEEDBACK_STORE=postgres                 # unset: sqlite (embedded), postgres (cluster)
    MESHLLM_FEEDBACK_DB=/var/lib/meshllm/feedback.sqlite   # unset: <data_dir>/feedback/...
    MESHLLM_FEEDBACK_DATABASE_URL=postgresql://meshllm:secret@postgres:5432/meshllm
    MESHLLM_FEEDBACK_API_PORT=8092                  # the internal API the gateway calls
    MESHLLM_AUDIT_URL=http://audit:8090             # where answers are looked up
    MESHLLM_RETENTION_DAYS='{"acme": 90}'           # the same setting the audit service reads
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr

from shared.settings import MeshSettings, Mode


class FeedbackSettings(MeshSettings):
    service_name: str = "feedback"
    feedback_api_host: str = Field("127.0.0.1", description="Where the internal API listens.")
    feedback_api_port: int = Field(8092, ge=0, le=65535, description="0 picks a free port.")
    feedback_store: Literal["sqlite", "postgres"] | None = Field(
        None, description="The back end; unset: sqlite in embedded mode, postgres in cluster."
    )
    feedback_db: Path | None = Field(
        None, description="The SQLite store; unset: <data_dir>/feedback/feedback.sqlite."
    )
    feedback_database_url: SecretStr | None = Field(
        None, description="PostgreSQL DSN (postgresql://user:password@host:port/database)."
    )
    feedback_database_password_file: Path | None = Field(
        None, description="A file holding the database password (a container secret)."
    )
    audit_url: str = Field(
        "http://127.0.0.1:8090", description="The audit service's API, where answers are read."
    )
    join_wait_s: float = Field(
        30.0,
        gt=0,
        le=600,
        description="How long a rating waits for its answer's audit records (the audit "
        "service may store them a moment after the answer); then the event is retried.",
    )
    answer_within_s: float = Field(
        900.0,
        gt=0,
        le=86_400,
        description="A request audited longer ago than this without a response record never "
        "got an answer: its rating goes to the dead-letter topic at once instead of waiting "
        "(the gateway's deadline is far shorter).",
    )
    retention_days: dict[str, int] = Field(
        default_factory=dict, description="Days each tenant's feedback is kept."
    )
    default_retention_days: int | None = Field(
        None, ge=1, description="Days for tenants not in retention_days; unset: forever."
    )
    quality_interval_s: float = Field(
        15.0, gt=0, le=3600, description="How often the quality gauges are read from the store."
    )
    max_dataset_rows: int = Field(100_000, ge=1, le=10_000_000)
    max_upload_bytes: int = Field(
        64 * 2**20, ge=1024, le=512 * 2**20, description="Largest JSONL file made a dataset."
    )

    def store_kind(self) -> str:
        if self.feedback_store is not None:
            return self.feedback_store
        return "sqlite" if self.mode is Mode.EMBEDDED else "postgres"

    def sqlite_path(self) -> Path:
        return self.feedback_db or Path(self.data_dir) / "feedback" / "feedback.sqlite"
