"""Settings shared by every service, read from the environment (prefix ``MESHLLM_``).

Nested settings use ``__``: ``MESHLLM_KAFKA__BOOTSTRAP=kafka:9092``. A bad value stops
start-up with :class:`SettingsError`, whose message names the environment variable.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.pii.settings import TenantPiiSettings

ENV_PREFIX = "MESHLLM_"


class SettingsError(ValueError):
    """Raised at start-up when a setting is missing or invalid."""


class Mode(StrEnum):
    EMBEDDED = "embedded"
    CLUSTER = "cluster"


class LogFormat(StrEnum):
    AUTO = "auto"
    JSON = "json"
    CONSOLE = "console"


class KafkaSettings(BaseModel):
    bootstrap: str = Field(
        "127.0.0.1:9092", description="Comma-separated host:port list of the Kafka brokers."
    )
    client_id_prefix: str = "meshllm"
    linger_ms: int = Field(0, ge=0, le=1000, description="Producer batching delay.")
    fetch_max_wait_ms: int | None = Field(
        None,
        ge=0,
        le=30_000,
        description=(
            "How long a fetch may wait at the broker for data. Unset: 5 ms on the embedded "
            "broker, which re-reads storage on a timer instead of waking fetches on new "
            "data, and 500 ms on Apache Kafka, which wakes them."
        ),
    )
    request_timeout_ms: int = Field(30_000, ge=1_000)
    session_timeout_ms: int | None = Field(
        None,
        ge=1_000,
        le=300_000,
        description=(
            "Consumer group session timeout. Unset: 3 s on the embedded broker, whose "
            "JoinGroup waits half of it before answering, and 10 s on Apache Kafka."
        ),
    )

    # Cluster mode: authenticate each service to Kafka (SASL/SCRAM and/or mutual TLS), so
    # that per-service ACLs in the cluster decide who may produce and consume what.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT",
        description="How clients talk to the brokers; SASL_SSL for SCRAM over TLS, SSL for "
        "mutual TLS with ssl_certfile/ssl_keyfile.",
    )
    sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] = "SCRAM-SHA-512"
    sasl_username: str | None = Field(None, description="This service's Kafka user (SASL).")
    sasl_password: SecretStr | None = Field(None, description="Its password (SASL).")
    ssl_cafile: Path | None = Field(None, description="CA bundle of the brokers' certificates.")
    ssl_certfile: Path | None = Field(None, description="This service's client certificate (mTLS).")
    ssl_keyfile: Path | None = Field(None, description="Its private key (mTLS).")

    @model_validator(mode="after")
    def _security_is_complete(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL") and not (
            self.sasl_username and self.sasl_password
        ):
            raise ValueError(
                f"security_protocol {self.security_protocol} needs sasl_username and "
                "sasl_password (MESHLLM_KAFKA__SASL_USERNAME, MESHLLM_KAFKA__SASL_PASSWORD)"
            )
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together (mutual TLS)")
        if self.ssl_certfile is not None and not self.security_protocol.endswith("SSL"):
            raise ValueError("a client certificate needs security_protocol SSL or SASL_SSL")
        return self

    @field_validator("bootstrap")
    @classmethod
    def _bootstrap_has_ports(cls, value: str) -> str:
        for address in value.split(","):
            host, _, port = address.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"bootstrap address {address!r} is not host:port")
        return value


class BusSettings(BaseModel):
    max_attempts: int = Field(3, ge=1, le=100, description="Handler tries before dead-letter.")
    retry_backoff_ms: int = Field(20, ge=0, le=60_000)
    max_batch: int = Field(500, ge=1, le=100_000)
    drain_timeout_ms: int = Field(
        10_000,
        ge=0,
        le=600_000,
        description="On a clean stop, how long to keep handling what the broker already holds.",
    )
    idempotency_window: int = Field(
        200_000, ge=1_000, description="Processed event ids remembered per consumer group."
    )
    signing_key_file: Path | None = Field(
        None,
        description="The mesh's event signing key (64 hex digits, 0600); unset: "
        "<tokens dir>/events.key. Producers sign when it exists (see shared/bus/signing.py).",
    )
    require_signed: bool | None = Field(
        None,
        description="Dead-letter enveloped events that are not signed with the mesh's key. "
        "Unset: on in cluster mode (any Kafka client could otherwise write a tenant or an "
        "ACL group that consumers trust), off in embedded mode, where `meshllm up` turns it on.",
    )
    local_wakeup: bool | None = Field(
        None,
        description="Producers on this machine wake the consumers of a topic after each "
        "acknowledged write, so idle consumers sleep instead of polling the broker (see "
        "shared/bus/wakeup.py). Unset: on with the embedded broker, which does not wake "
        "waiting fetches, off with Apache Kafka, which does.",
    )
    idle_poll_ms: int = Field(
        1000,
        ge=10,
        le=60_000,
        description="With local wake-ups, how often a sleeping consumer fetches anyway, "
        "for records whose producer announced nothing (another machine, another tool).",
    )


class TelemetrySettings(BaseModel):
    otlp_endpoint: str | None = Field(
        None,
        description="OTLP/HTTP collector base URL for traces, e.g. http://otel-collector:4318 "
        "(metrics are scraped from /metrics).",
    )
    spans_to_kafka: bool = Field(True, description="Publish spans to telemetry.spans.")
    kafka_spans: Literal["answers", "all"] = Field(
        "answers",
        description="Which spans go to telemetry.spans: the gateway's answer spans (what the "
        "ops service reads; encoding every span cost the gateway and router the most of "
        "their telemetry CPU) or all of them (whole traces on the bus). The OTLP endpoint, "
        "when set, gets all of them either way.",
    )
    sample_ratio: float = Field(1.0, ge=0.0, le=1.0)
    prometheus: bool = Field(
        True, description="Serve metrics in Prometheus' format at /metrics on the health port."
    )


class ServiceAuthSettings(BaseModel):
    """Where this service's own token and its callers' token digests are."""

    token: SecretStr | None = Field(
        None, description="This service's own token (64 hex digits); unset: token_file."
    )
    token_file: Path | None = Field(
        None, description="A file holding this service's token; unset: <tokens_dir>/<name>.token."
    )
    tokens_dir: Path | None = Field(
        None,
        description="Where callers' <name>.token or <name>.sha256 are; unset: "
        "<data_dir>/run/service-tokens (made there in embedded mode).",
    )


class MeshSettings(BaseSettings):
    """Settings every service reads; services subclass it for their own."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="ignore"
    )

    mode: Mode = Mode.EMBEDDED
    service_name: str = "meshllm"
    instance_id: str = ""
    data_dir: Path = Path("var")
    log_level: str = Field("INFO", pattern=r"^(?i:debug|info|warning|error|critical)$")
    log_format: LogFormat = LogFormat.AUTO
    health_host: str = "127.0.0.1"
    health_port: int = Field(0, ge=0, le=65535, description="0 picks a free port.")
    kafka: KafkaSettings = KafkaSettings()
    bus: BusSettings = BusSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    # Service identity between the mesh's own services (see shared/service_auth.py)
    service_auth: ServiceAuthSettings = ServiceAuthSettings()
    # What PII is masked, tokenized or dropped per tenant, in logs, audit, feedback, training
    pii: TenantPiiSettings = TenantPiiSettings()
    release_max_lease_s: float = Field(
        300.0,
        gt=0,
        le=3600,
        description="The longest a release's traffic split (a CANARY on model.deployments) "
        "holds unrenewed; routers refuse longer leases, and routers and inference replicas "
        "read this far back on start to find the live releases.",
    )

    @property
    def signatures_required(self) -> bool:
        """Whether consumers dead-letter events not signed with the mesh's key."""
        if self.bus.require_signed is not None:
            return self.bus.require_signed
        return self.mode is Mode.CLUSTER

    @property
    def local_wakeup(self) -> bool:
        """Whether producers announce writes and idle consumers sleep until told."""
        if self.bus.local_wakeup is None:
            return self.mode is Mode.EMBEDDED
        return self.bus.local_wakeup

    @property
    def fetch_max_wait_ms(self) -> int:
        if self.kafka.fetch_max_wait_ms is not None:
            return self.kafka.fetch_max_wait_ms
        return 5 if self.mode is Mode.EMBEDDED else 500

    @property
    def session_timeout_ms(self) -> int:
        if self.kafka.session_timeout_ms is not None:
            return self.kafka.session_timeout_ms
        return 3_000 if self.mode is Mode.EMBEDDED else 10_000


Settings = TypeVar("Settings", bound=MeshSettings)


def _env_name(location: tuple[int | str, ...]) -> str:
    return ENV_PREFIX + "__".join(str(part).upper() for part in location)


def load_settings(cls: type[Settings], **overrides: Any) -> Settings:
    """Build ``cls`` from the environment, turning validation errors into one clear message.

    Raises:
        SettingsError: naming each bad environment variable and why it was refused.
    """
    try:
        return cls(**overrides)
    except ValidationError as error:
        problems = [
            f"{_env_name(detail['loc'])}: {detail['msg']} (got {detail.get('input')!r})"
            for detail in error.errors()
        ]
        raise SettingsError("invalid settings:\n  " + "\n  ".join(problems)) from None
