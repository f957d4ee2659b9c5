"""Settings of the trainer service (``MESHLLM_`` prefix, nested with ``__``).

Examples::

    MESHLLM_TRAINER_STORE=postgres                  # unset: sqlite (embedded), postgres (cluster)
    MESHLLM_TRAINER_DATABASE_URL=postgresql://meshllm:secret@postgres:5432/meshllm
    MESHLLM_TRAINER_API_PORT=8093                   # the internal API the gateway calls
    MESHLLM_TRAINER_DIR=/var/lib/meshllm/trainer    # files, runs, the base-model cache
    MESHLLM_TRAIN__WORKERS=4                        # Ray Train workers per job
    MESHLLM_TRAIN__USE_GPU=true                     # one GPU per worker
    MESHLLM_TRAIN__RAY_ADDRESS=ray://head:10001     # run jobs on a Ray cluster
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr

from shared.settings import MeshSettings, Mode


class TrainSettings(BaseModel):
    """How each job runs on Ray Train."""

    workers: int = Field(1, ge=1, le=512, description="Ray Train workers (data-parallel).")
    use_gpu: bool = Field(False, description="Give each worker one GPU.")
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="How workers share the model: replicated (ddp) or sharded (fsdp)."
    )
    ray_address: str | None = Field(
        None, description="A Ray cluster to run jobs on; unset: a local Ray per job."
    )
    checkpoint_every: int = Field(
        20, ge=1, le=100_000, description="Steps between checkpoints (and weight checks)."
    )
    max_attempts: int = Field(
        3, ge=1, le=10, description="Runs of a job whose runner died before it is failed."
    )
    edge_quant: Literal["auto", "q4_0", "none"] = Field(
        "auto",
        description="Also export each trained model in 4 bits (Q4_0) for edge devices, "
        "registered as a second candidate only when it passes the quality check against "
        "the float result; auto: unless the base's layers are 4-bit already (the bundled "
        "Q4_1 model: a second 4-bit rounding never passes); none: Q8_0 only.",
    )


class TrainerSettings(MeshSettings):
    service_name: str = "trainer"
    trainer_api_host: str = Field("127.0.0.1", description="Where the internal API listens.")
    trainer_api_port: int = Field(8093, ge=0, le=65535, description="0 picks a free port.")
    trainer_store: Literal["sqlite", "postgres"] | None = Field(
        None, description="The back end; unset: sqlite in embedded mode, postgres in cluster."
    )
    trainer_db: Path | None = Field(
        None, description="The SQLite store; unset: <trainer_dir>/trainer.sqlite."
    )
    trainer_database_url: SecretStr | None = Field(
        None, description="PostgreSQL DSN (postgresql://user:password@host:port/database)."
    )
    trainer_database_password_file: Path | None = Field(
        None, description="A file holding the database password (a container secret)."
    )
    trainer_dir: Path | None = Field(
        None,
        description="Uploaded files, job runs (checkpoints, outputs) and the base-model "
        "cache; unset: <data_dir>/trainer. Shared by every trainer replica in a cluster.",
    )
    feedback_url: str = Field(
        "http://127.0.0.1:8092",
        description="The feedback service's API, where a job's dataset is read.",
    )
    model_dir: Path | None = Field(
        None, description="The model registry directory; unset: <data_dir>/models."
    )
    max_file_bytes: int = Field(
        512 * 2**20, ge=1024, le=8 * 2**30, description="Largest file POST /v1/files takes."
    )
    max_file_rows: int = Field(1_000_000, ge=1, description="Most rows in one training file.")
    max_running_jobs: int = Field(
        1, ge=1, le=64, description="Jobs this replica runs at once (each starts its own Ray)."
    )
    lease_s: float = Field(
        60.0,
        ge=5,
        le=3600,
        description="A running job's lease; a runner renews it every third of it. A job "
        "whose lease ran out lost its runner: another takes it over from its last checkpoint.",
    )
    scan_interval_s: float = Field(
        10.0, gt=0, le=600, description="How often the store is looked at for jobs to run."
    )
    train: TrainSettings = Field(default_factory=TrainSettings)

    def store_kind(self) -> str:
        if self.trainer_store is not None:
            return self.trainer_store
        return "sqlite" if self.mode is Mode.EMBEDDED else "postgres"

    def root(self) -> Path:
        return self.trainer_dir or Path(self.data_dir) / "trainer"

    def sqlite_path(self) -> Path:
        return self.trainer_db or self.root() / "trainer.sqlite"

    def registry_dir(self) -> Path:
        return self.model_dir or Path(self.data_dir) / "models"
