"""Settings of the ops service (``MESHLLM_`` prefix, nested with ``__``).

Examples::

    MESHLLM_OPS__RULES_FILE=/etc/meshllm/rules.yaml   # unset: the bundled rules.yaml
    MESHLLM_OPS__EVALUATE_EVERY_S=5
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, model_validator

from shared.settings import MeshSettings, TelemetrySettings


class OpsConfig(BaseModel):
    rules_file: Path | None = Field(
        None, description="The alert rules (YAML); unset: services/ops/rules.yaml."
    )
    bucket_s: float = Field(10.0, gt=0, le=300, description="Time bucket of the SLI windows.")
    keep_s: float = Field(
        900.0, gt=0, le=86_400, description="How far back the windows reach (the longest rule)."
    )
    evaluate_every_s: float = Field(5.0, gt=0, le=300, description="How often rules run.")

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
