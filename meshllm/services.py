"""The services ``meshllm up`` starts, in start order.

Each entry is a real service package under ``services/``; a service joins this list
in the change that builds it, never before.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    module: str
    # Edge services take work from outside; they stop first so the rest can drain.
    edge: bool = False
    env: dict[str, str] = field(default_factory=dict)
    ready_timeout_s: float = 60.0


SERVICES: tuple[ServiceSpec, ...] = (
    # Ray start, model load and a probe generation: ~20-60 s on two cores.
    ServiceSpec(name="inference", module="services.inference", ready_timeout_s=300.0),
    # the knowledge base; it embeds through the inference service's embeddings deployment
    ServiceSpec(name="retrieval", module="services.retrieval"),
    ServiceSpec(name="router", module="services.router"),
    # before the gateway: it answers nothing whose audit record the store has not taken
    ServiceSpec(name="audit", module="services.audit"),
    # ratings joined with the audited answers, and datasets from them (reads the audit API)
    ServiceSpec(name="feedback", module="services.feedback"),
    # fine-tuning jobs on Ray Train (a local Ray per job), their files and candidates
    ServiceSpec(name="trainer", module="services.trainer"),
    # SLIs from the answers' spans, alert rules; it serves no API (its /metrics shows both)
    ServiceSpec(name="ops", module="services.ops"),
    ServiceSpec(name="gateway", module="services.gateway", edge=True),
)
