"""Settings of the gateway (``MESHLLM_`` prefix, nested with ``__``).

Examples::

    MESHLLM_HTTP_PORT=8080
    MESHLLM_KEYS_DB=/var/lib/meshllm/keys.sqlite     # unset: <data_dir>/gateway/keys.sqlite
    MESHLLM_POLICY_DIR=/etc/meshllm/policies          # unset: the repository's policies/
    MESHLLM_POLICY__ENGINE=opa                        # unset: embedded (regorus, in process)
    MESHLLM_POLICY__OPA_URL=http://opa:8181
    MESHLLM_JWT__ISSUER=https://idp.example.com/
    MESHLLM_JWT__KEY="$(cat idp-public-key.pem)"
    MESHLLM_JWT__ALGORITHMS='["RS256"]'
    MESHLLM_LIMITS__DEFAULT_RPM=600
"""

from __future__ import annotations

from pathlib import Path

from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from services.gateway.audit import AuditSettings
from services.gateway.auth import JwtVerifier
from shared.policy.settings import PolicySettings
from shared.settings import MeshSettings, Mode

REPO_POLICY_DIR = Path(__file__).resolve().parents[2] / "policies"
"""``policies/`` of the checkout this package runs from (an editable install or the tree)."""


class JwtConfig(BaseModel):
    """A trusted token issuer; JWT authentication is on when ``issuer`` and ``key`` are set.

    Validators check fields one by one (the key first) so that an error never quotes the key.
    """

    key: SecretStr | None = Field(
        None, description="The issuer's HS256/384/512 shared secret, or its PEM public key."
    )
    issuer: str | None = Field(None, validate_default=True, description="The expected `iss`.")
    algorithms: list[str] = Field(
        default_factory=lambda: ["RS256"], validate_default=True, description="Accepted `alg`s."
    )
    audience: str | None = Field(None, description="The expected `aud`; unset: no `aud` allowed.")
    tenant_claim: str = Field("tenant", min_length=1)
    roles_claim: str = Field("roles", min_length=1)

    @field_validator("issuer")
    @classmethod
    def _issuer_needs_key(cls, issuer: str | None, info: ValidationInfo) -> str | None:
        has_key = info.data.get("key") is not None
        if issuer and not has_key:
            raise ValueError("MESHLLM_JWT__KEY must be set when MESHLLM_JWT__ISSUER is")
        if has_key and not issuer:
            raise ValueError("MESHLLM_JWT__ISSUER must be set when MESHLLM_JWT__KEY is")
        return issuer

    @field_validator("algorithms")
    @classmethod
    def _key_fits_algorithms(cls, algorithms: list[str], info: ValidationInfo) -> list[str]:
        key, issuer = info.data.get("key"), info.data.get("issuer")
        if key is not None and issuer:
            try:
                JwtVerifier(issuer, key.get_secret_value(), algorithms)
            except ValueError as error:
                raise ValueError(
                    f"MESHLLM_JWT__KEY does not fit the algorithms ({error})"
                ) from None
        return algorithms

    @property
    def enabled(self) -> bool:
        return bool(self.issuer) and self.key is not None

    def verifier(self) -> JwtVerifier | None:
        """The verifier these settings describe; None when JWT authentication is off."""
        if self.key is None or not self.issuer:
            return None
        return JwtVerifier(
            self.issuer,
            self.key.get_secret_value(),
            self.algorithms,
            self.audience,
            tenant_claim=self.tenant_claim,
            roles_claim=self.roles_claim,
        )


class LimitsConfig(BaseModel):
    """Default rate and concurrency limits; an API key may override its rpm and tpm."""

    default_rpm: int = Field(600, ge=1, description="Requests per minute of a key.")
    default_tpm: int = Field(200_000, ge=1, description="Tokens per minute of a key.")
    tenant_rpm: int = Field(6_000, ge=1, description="Requests per minute of a tenant.")
    tenant_tpm: int = Field(2_000_000, ge=1, description="Tokens per minute of a tenant.")
    max_concurrent_per_key: int = Field(32, ge=1)
    max_concurrent_per_tenant: int = Field(256, ge=1)
    max_body_bytes: int = Field(1_048_576, ge=1_024, description="Larger request bodies: 413.")
    redis_url: str | None = Field(
        None,
        pattern=r"^rediss?://\S+$",  # pydantic matches the whole string: no trailing newline
        description="Redis shared by every gateway for the rate and concurrency limits "
        "(redis://host:port/db, rediss:// for TLS). Unset: limits per gateway process, which "
        "only the embedded mode allows (N gateways would give each key N times its limits).",
    )
    body_timeout_s: float = Field(
        10.0, gt=0, le=300, description="A request body not all there by then: 408."
    )


class KbSettings(BaseModel):
    service_url: str = Field(
        "http://127.0.0.1:8091", description="The retrieval service that /v1/kb/* forwards to."
    )
    max_document_bytes: int = Field(
        15 * 2**20,
        ge=1024,
        le=15 * 2**20,
        description="Largest document accepted (kb.ingest carries at most 16 MiB a message).",
    )
    body_timeout_s: float = Field(
        60.0,
        gt=0,
        le=600,
        description="A /v1/kb/* body (up to a whole document) not all there by then: 408.",
    )
    max_search_collections: int = Field(
        16,
        ge=1,
        le=32,  # the retrieval service takes at most 32
        description="Most distinct collections one /v1/kb/search names (each is one policy "
        "decision and one audit record).",
    )
    max_top_k: int = Field(50, ge=1, le=1000, description="Most hits one search may ask for.")


class TrainingRouteSettings(BaseModel):
    service_url: str = Field(
        "http://127.0.0.1:8093",
        description="The trainer that /v1/files and /v1/fine_tuning/jobs forward to.",
    )
    max_file_bytes: int = Field(
        512 * 2**20, ge=1024, le=8 * 2**30, description="Largest file POST /v1/files takes."
    )
    body_timeout_s: float = Field(30.0, gt=0, le=600, description="A body not all there: 408.")
    upload_timeout_s: float = Field(
        600.0, gt=0, le=7200, description="A file not all there in this time: 408."
    )


class FeedbackRouteSettings(BaseModel):
    service_url: str = Field(
        "http://127.0.0.1:8092",
        description="The feedback service that /v1/feedback and /v1/datasets forward to.",
    )
    lookup_wait_s: float = Field(
        2.0,
        ge=0,
        le=30,
        description="How long a rating's answer is looked for in the audit log before a 404 "
        "(its record is stored a moment after the answer is sent).",
    )
    body_timeout_s: float = Field(30.0, gt=0, le=600, description="A body not all there: 408.")
    max_upload_bytes: int = Field(
        64 * 2**20, ge=1024, le=512 * 2**20, description="Largest JSONL file made a dataset."
    )
    upload_timeout_s: float = Field(300.0, gt=0, le=3600, description="An upload's time limit.")
    build_timeout_s: float = Field(
        600.0, gt=0, le=3600, description="How long a dataset build may take before a 503."
    )


class GatewaySettings(MeshSettings):
    """The gateway: where it listens, where keys and policies live, who it trusts, its limits."""

    service_name: str = "gateway"
    http_host: str = "127.0.0.1"
    http_port: int = Field(8080, ge=0, le=65535, description="0 picks a free port.")
    keys_db: Path | None = Field(
        None, description="The API key database; unset: <data_dir>/gateway/keys.sqlite."
    )
    key_cache_ttl_s: float = Field(
        5.0,
        ge=0,
        le=300,
        description="How long a verified key is trusted from memory; a revoke made by another "
        "process takes effect within this time. 0: check the database on every request.",
    )
    policy_dir: Path = Field(
        REPO_POLICY_DIR, description="The `.rego` files and their `data.json`."
    )
    policy: PolicySettings = PolicySettings()
    jwt: JwtConfig = JwtConfig()
    limits: LimitsConfig = LimitsConfig()
    request_timeout_s: float = Field(
        120.0, gt=0, description="A request without its reply by then gets 504."
    )
    default_model: str = Field("smollm2-135m-instruct", min_length=1)
    models: list[str] = Field(
        default_factory=lambda: ["smollm2-135m-instruct"],
        description="Chat and completion models GET /v1/models lists (each filtered by the "
        "caller's policy).",
    )
    embedding_models: list[str] = Field(
        default_factory=lambda: ["multilingual-e5-small"],
        description="Embedding models GET /v1/models lists (each filtered by the caller's policy).",
    )

    audit: AuditSettings = AuditSettings()
    kb: KbSettings = KbSettings()
    feedback: FeedbackRouteSettings = FeedbackRouteSettings()
    training: TrainingRouteSettings = TrainingRouteSettings()

    @model_validator(mode="after")
    def _shared_limits_in_a_cluster(self) -> GatewaySettings:
        if self.mode is Mode.CLUSTER and self.limits.redis_url is None:
            raise ValueError(
                "MESHLLM_LIMITS__REDIS_URL must be set in cluster mode: the gateways share "
                "their rate and concurrency limits in Redis (per-process limits would give a "
                "key N times its allowance behind N gateways)"
            )
        return self

    @property
    def audit_spool_path(self) -> Path:
        """Where audit records wait when Kafka does not ack them."""
        if self.audit.spool is not None:
            return self.audit.spool
        return self.data_dir / "gateway" / "audit-spool.jsonl"

    @property
    def keys_db_path(self) -> Path:
        """Where the API keys live."""
        return (
            self.keys_db if self.keys_db is not None else self.data_dir / "gateway" / "keys.sqlite"
        )
