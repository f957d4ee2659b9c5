"""Settings of the ops service (``MESHLLM_`` prefix, nested with ``__``).

Examples::

    MESHLLM_OPS__RULES_FILE=/etc/meshllm/rules.yaml   # unset: the bundled rules.yaml
    MESHLLM_OPS__EVALUATE_EVERY_S=5
    MESHLLM_OPS__SCALING__ENABLED=false               # decide nothing, publish nothing
    MESHLLM_OPS__SCALING__CHAT__MAX_REPLICAS=2
    MESHLLM_OPS__SCALING__CHAT__OUT_P99_S=0.5
    MESHLLM_OPS__ALERTMANAGER_URL=http://alertmanager:9093
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AnyHttpUrl, BaseModel, Field, model_validator

from services.ops.scaling import ScalingPolicy
from shared.deployments import CHAT_DEPLOYMENT, EMBEDDINGS_DEPLOYMENT
from shared.settings import MeshSettings, TelemetrySettings


class ChatScaling(ScalingPolicy):
    deployment: str = Field(CHAT_DEPLOYMENT, min_length=1)
    operations: tuple[str, ...] = Field(("chat", "text_completion"), min_length=1)


class EmbeddingsScaling(ScalingPolicy):
    deployment: str = Field(EMBEDDINGS_DEPLOYMENT, min_length=1)
    operations: tuple[str, ...] = Field(("embeddings",), min_length=1)
    max_replicas: int = Field(2, ge=1)
    # the request topics carry mostly chat: their lag would mislead
    out_waiting_per_replica: float | None = Field(None, gt=0)


class ScalingConfig(BaseModel):
    """Replica decisions for the inference service's Serve deployments (see
    :mod:`services.ops.scaling`); the inference service applies them within its own bounds."""

    enabled: bool = Field(True, description="Decide replica counts and publish them.")
    group: str = Field(
        "router",
        min_length=1,
        description="The consumer group whose lag on the request topics is the queue.",
    )
    chat: ChatScaling = ChatScaling()
    embeddings: EmbeddingsScaling = EmbeddingsScaling()

    def policies(self) -> tuple[ScalingPolicy, ...]:
        return (self.chat, self.embeddings)


class OpsConfig(BaseModel):
    rules_file: Path | None = Field(
        None, description="The alert rules (YAML); unset: services/ops/rules.yaml."
    )
    bucket_s: float = Field(10.0, gt=0, le=300, description="Time bucket of the SLI windows.")
    keep_s: float = Field(
        900.0, gt=0, le=86_400, description="How far back the windows reach (the longest rule)."
    )
    evaluate_every_s: float = Field(
        5.0, gt=0, le=300, description="How often rules run and replica counts are decided."
    )
    scaling: ScalingConfig = ScalingConfig()
    alertmanager_url: AnyHttpUrl | None = Field(
        None,
        description="An Alertmanager (e.g. http://alertmanager:9093) to send the alerts to, "
        "besides ops.alerts; unset: none.",
    )

    @model_validator(mode="after")
    def _keep_whole_buckets(self) -> OpsConfig:
        if self.keep_s < self.bucket_s:
            raise ValueError(f"keep_s ({self.keep_s}) must be at least bucket_s ({self.bucket_s})")
        return self


class OpsSettings(MeshSettings):
    service_name: str = "ops"
    ops: OpsConfig = OpsConfig()
    # its own spans stay off telemetry.spans: reading a record makes a span, which would
    # be a record to read, for ever (an OTLP endpoint still gets them when one is set)
    telemetry: TelemetrySettings = TelemetrySettings(spans_to_kafka=False)
