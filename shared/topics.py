"""The single registry of Kafka topics: name, partitions, retention, key, messages.

Producers and consumers name topics only through this module; the broker set-up,
the AsyncAPI reference (docs/asyncapi.yaml) and the Compose init job all read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf.message import Message

from shared.events.v1 import events_pb2 as ev

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
DLQ_SUFFIX = ".dlq"


@dataclass(frozen=True)
class Topic:
    name: str
    messages: tuple[type[Message], ...]
    key: str
    partitions: int
    retention_ms: int
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    description: str
    enveloped: bool = True
    extra_config: dict[str, str] = field(default_factory=dict)

    @property
    def dlq(self) -> str:
        return self.name + DLQ_SUFFIX

    def accepts(self, message: type[Message]) -> bool:
        return message in self.messages

    def message_by_name(self, full_name: str) -> type[Message] | None:
        for message in self.messages:
            if message.DESCRIPTOR.full_name == full_name:
                return message
        return None


def _requests(priority: str, partitions: int) -> Topic:
    return Topic(
        name=f"llm.requests.{priority}",
        messages=(ev.InferenceRequest,),
        key="request_id",
        partitions=partitions,
        retention_ms=DAY_MS,
        producers=("gateway",),
        consumers=("router",),
        description=f"Inference requests of {priority} priority, waiting for the router.",
    )


REQUESTS_HIGH = _requests("high", 3)
REQUESTS_NORMAL = _requests("normal", 3)
REQUESTS_LOW = _requests("low", 3)

REPLIES = Topic(
    name="llm.replies",
    messages=(ev.ReplyChunk, ev.FinalReply),
    key="request_id",
    partitions=3,
    retention_ms=HOUR_MS,
    producers=("router",),
    consumers=("gateway",),
    description="Reply chunks then the final reply of each request (the default reply_topic).",
)
CANCELLATIONS = Topic(
    name="llm.cancellations",
    messages=(ev.CancelRequest,),
    key="request_id",
    partitions=1,
    retention_ms=HOUR_MS,
    producers=("gateway",),
    consumers=("router",),
    description="Requests whose caller went away; every router instance reads all of them.",
)
AUDIT_EVENTS = Topic(
    name="audit.events",
    messages=(ev.AuditEvent,),
    key="request_id",
    partitions=3,
    retention_ms=7 * DAY_MS,
    producers=("gateway", "router", "ops"),
    consumers=("audit",),
    description="Requests, responses, routing, policy and scaling decisions, for the audit store.",
)
AUDIT_CHECKPOINTS = Topic(
    name="audit.checkpoints",
    messages=(ev.AuditCheckpoint,),
    key="log_id",
    partitions=1,
    retention_ms=-1,  # kept forever: witnesses of the audit log's history
    producers=("audit",),
    consumers=("witnesses",),
    description="Signed checkpoints (tree size and Merkle root) of the audit log.",
)
FEEDBACK_EVENTS = Topic(
    name="feedback.events",
    messages=(ev.FeedbackEvent,),
    key="request_id",
    partitions=3,
    retention_ms=7 * DAY_MS,
    producers=("gateway",),
    consumers=("feedback",),
    description="User ratings, labels and corrections of responses.",
)
TRAINING_DATASETS = Topic(
    name="training.datasets",
    messages=(ev.DatasetReady,),
    key="dataset_id",
    partitions=1,
    retention_ms=30 * DAY_MS,
    producers=("feedback",),
    consumers=("trainer",),
    description="Privacy-scrubbed datasets ready for training.",
)
TRAINING_JOBS = Topic(
    name="training.jobs",
    messages=(ev.TrainingJob,),
    key="job_id",
    partitions=1,
    retention_ms=30 * DAY_MS,
    producers=("trainer",),
    consumers=("trainer",),
    description="Fine-tuning jobs created through the API, for the trainer's runners to run "
    "(the job's row in the trainer's store is the truth; this is the wake-up).",
)
TRAINING_PROGRESS = Topic(
    name="training.progress",
    messages=(ev.TrainingProgress,),
    key="job_id",
    partitions=1,
    retention_ms=7 * DAY_MS,
    producers=("trainer",),
    consumers=("clients", "ops"),
    description="Fine-tuning jobs' states, and step, loss, tokens/s and ETA while they run.",
)
MODEL_CANDIDATES = Topic(
    name="model.candidates",
    messages=(ev.ModelCandidate,),
    key="model",
    partitions=1,
    retention_ms=30 * DAY_MS,
    producers=("trainer",),
    consumers=("trainer",),
    description="Trained model versions waiting for the release gate.",
)
MODEL_DEPLOYMENTS = Topic(
    name="model.deployments",
    messages=(ev.ModelDeployment,),
    key="model",
    partitions=1,
    retention_ms=30 * DAY_MS,
    producers=("release controller",),
    consumers=("router", "inference"),
    description="Canary (a traffic split with a lease), promote, roll back and retire "
    "decisions for model versions; every router applies the split to callers naming no "
    "version.",
)
MODEL_STATUS = Topic(
    name="model.status",
    messages=(ev.ModelStatus,),
    key="model",
    partitions=1,
    retention_ms=DAY_MS,
    producers=("inference",),
    consumers=("router", "ops"),
    description="Loading, ready and failed states of model versions per pool.",
)
OPS_ALERTS = Topic(
    name="ops.alerts",
    messages=(ev.OpsAlert,),
    key="alert_id",
    partitions=1,
    retention_ms=7 * DAY_MS,
    producers=("ops",),
    consumers=("operators",),
    description="SLO alerts raised and resolved by the ops loop.",
)
OPS_SCALING = Topic(
    name="ops.scaling",
    messages=(ev.ScalingDecision,),
    key="deployment",
    partitions=1,
    retention_ms=DAY_MS,
    producers=("ops",),
    consumers=("inference", "ops"),
    description="Replica targets decided by the ops loop (which reads its recent ones back "
    "after a restart, for its cooldowns).",
)
KB_INGEST = Topic(
    name="kb.ingest",
    messages=(ev.KbIngest,),
    key="document_id",
    partitions=3,
    retention_ms=7 * DAY_MS,
    producers=("gateway", "clients"),
    consumers=("retrieval",),
    description="Documents to add to, replace in or delete from the knowledge base.",
    extra_config={"max.message.bytes": str(16 * 1024 * 1024)},
)
KB_INDEXED = Topic(
    name="kb.indexed",
    messages=(ev.KbIndexed,),
    key="document_id",
    partitions=1,
    retention_ms=7 * DAY_MS,
    producers=("retrieval",),
    consumers=("clients",),
    description="Per-document ingestion progress and failures.",
)
TELEMETRY_SPANS = Topic(
    name="telemetry.spans",
    messages=(),
    key="service.name",
    partitions=3,
    retention_ms=DAY_MS,
    producers=("every service",),
    consumers=("ops",),
    description=(
        "OpenTelemetry spans as OTLP protobuf "
        "(opentelemetry.proto.collector.trace.v1.ExportTraceServiceRequest), no envelope."
    ),
    enveloped=False,
)

REGISTRY: tuple[Topic, ...] = (
    REQUESTS_HIGH,
    REQUESTS_NORMAL,
    REQUESTS_LOW,
    REPLIES,
    CANCELLATIONS,
    AUDIT_EVENTS,
    AUDIT_CHECKPOINTS,
    FEEDBACK_EVENTS,
    TRAINING_DATASETS,
    TRAINING_JOBS,
    TRAINING_PROGRESS,
    MODEL_CANDIDATES,
    MODEL_DEPLOYMENTS,
    MODEL_STATUS,
    OPS_ALERTS,
    OPS_SCALING,
    KB_INGEST,
    KB_INDEXED,
    TELEMETRY_SPANS,
)

DLQ_PARTITIONS = 1
DLQ_RETENTION_MS = 30 * DAY_MS


def by_name(name: str) -> Topic:
    for topic in REGISTRY:
        if topic.name == name:
            return topic
    raise KeyError(f"unknown topic {name!r}; registered: {', '.join(t.name for t in REGISTRY)}")
