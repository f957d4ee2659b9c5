"""Settings of the router (``MESHLLM_`` prefix, nested with ``__``).

Pools are a JSON list, for example::

    MESHLLM_POOLS='[{"name": "gpu", "kind": "gpu", "replicas": ["http://vllm-0:8000"]},
                    {"name": "cpu", "kind": "cpu", "replicas": ["http://127.0.0.1:8000"]}]'
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from shared.settings import MeshSettings

PriorityName = Literal["high", "normal", "low"]
ALL_PRIORITIES: tuple[PriorityName, ...] = ("high", "normal", "low")


class PoolConfig(BaseModel):
    """Replicas of one inference pool, each an OpenAI-compatible base URL."""

    name: str = Field(min_length=1, pattern=r"^[a-z0-9][a-z0-9_-]*$")
    kind: Literal["gpu", "cpu"] = "cpu"
    replicas: list[str] = Field(min_length=1)
    max_concurrency: int = Field(
        32, ge=1, description="Requests this pool runs at once; more wait in Kafka."
    )
    priorities: list[PriorityName] = Field(
        default_factory=lambda: list(ALL_PRIORITIES),
        description="Priorities this pool serves.",
    )
    service_token: bool = Field(
        True,
        description="Send the router's service token (the mesh's inference service requires "
        "it); false for a pool run by others, which must not get it.",
    )

    @field_validator("replicas")
    @classmethod
    def _urls(cls, replicas: list[str]) -> list[str]:
        for url in replicas:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"replica {url!r} is not an http(s) URL")
        return [url.rstrip("/") for url in replicas]


class SchedulingConfig(BaseModel):
    """How waiting requests of different priorities are ordered."""

    aging_s: float = Field(
        2.0,
        gt=0,
        description="Waiting this long lifts a request one priority level (no starvation).",
    )
    max_buffered: int = Field(
        16, ge=1, description="Requests fetched ahead per priority topic, beyond those running."
    )


class RagConfig(BaseModel):
    """Retrieval-augmented answers: where the knowledge base is and how much goes in."""

    retrieval_url: str = Field(
        "http://127.0.0.1:8091", description="The retrieval service's search API."
    )
    top_k: int = Field(4, ge=1, le=16, description="Chunks put into the prompt by default.")
    max_context_chars: int = Field(
        3000,
        ge=200,
        le=100_000,
        description="Characters of sources the prompt may hold (the model's context budget).",
    )
    timeout_s: float = Field(10.0, gt=0, description="How long a search may take.")


class RouterSettings(MeshSettings):
    service_name: str = "router"
    pools: list[PoolConfig] = Field(
        default_factory=lambda: [
            PoolConfig(name="cpu", kind="cpu", replicas=["http://127.0.0.1:8000"])
        ],
        min_length=1,
    )
    scheduling: SchedulingConfig = SchedulingConfig()
    rag: RagConfig = RagConfig()
    connect_timeout_s: float = Field(2.0, gt=0)
    replica_cooldown_s: float = Field(
        10.0, ge=0, description="How long a replica that failed is passed over."
    )
    default_deadline_s: float = Field(
        120.0, gt=0, description="Deadline of a request that carries none."
    )

    @model_validator(mode="after")
    def _unique_pools(self) -> RouterSettings:
        names = [pool.name for pool in self.pools]
        if len(set(names)) != len(names):
            raise ValueError(f"pool names must be unique, got {names}")
        return self

    @property
    def max_in_flight(self) -> int:
        return sum(pool.max_concurrency for pool in self.pools)
