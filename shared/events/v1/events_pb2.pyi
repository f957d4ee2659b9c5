import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIORITY_UNSPECIFIED: _ClassVar[Priority]
    PRIORITY_LOW: _ClassVar[Priority]
    PRIORITY_NORMAL: _ClassVar[Priority]
    PRIORITY_HIGH: _ClassVar[Priority]

class RequestKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REQUEST_KIND_UNSPECIFIED: _ClassVar[RequestKind]
    REQUEST_KIND_CHAT: _ClassVar[RequestKind]
    REQUEST_KIND_COMPLETION: _ClassVar[RequestKind]
    REQUEST_KIND_EMBEDDING: _ClassVar[RequestKind]

class TrainingState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRAINING_STATE_UNSPECIFIED: _ClassVar[TrainingState]
    TRAINING_STATE_QUEUED: _ClassVar[TrainingState]
    TRAINING_STATE_RUNNING: _ClassVar[TrainingState]
    TRAINING_STATE_SUCCEEDED: _ClassVar[TrainingState]
    TRAINING_STATE_FAILED: _ClassVar[TrainingState]
    TRAINING_STATE_CANCELLED: _ClassVar[TrainingState]

class DeploymentAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEPLOYMENT_ACTION_UNSPECIFIED: _ClassVar[DeploymentAction]
    DEPLOYMENT_ACTION_CANARY: _ClassVar[DeploymentAction]
    DEPLOYMENT_ACTION_PROMOTE: _ClassVar[DeploymentAction]
    DEPLOYMENT_ACTION_ROLLBACK: _ClassVar[DeploymentAction]
    DEPLOYMENT_ACTION_RETIRE: _ClassVar[DeploymentAction]

class ModelState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATE_UNSPECIFIED: _ClassVar[ModelState]
    MODEL_STATE_LOADING: _ClassVar[ModelState]
    MODEL_STATE_READY: _ClassVar[ModelState]
    MODEL_STATE_FAILED: _ClassVar[ModelState]
    MODEL_STATE_UNLOADED: _ClassVar[ModelState]

class AlertState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALERT_STATE_UNSPECIFIED: _ClassVar[AlertState]
    ALERT_STATE_FIRING: _ClassVar[AlertState]
    ALERT_STATE_RESOLVED: _ClassVar[AlertState]

class IndexState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INDEX_STATE_UNSPECIFIED: _ClassVar[IndexState]
    INDEX_STATE_STARTED: _ClassVar[IndexState]
    INDEX_STATE_INDEXED: _ClassVar[IndexState]
    INDEX_STATE_UNCHANGED: _ClassVar[IndexState]
    INDEX_STATE_DELETED: _ClassVar[IndexState]
    INDEX_STATE_FAILED: _ClassVar[IndexState]
PRIORITY_UNSPECIFIED: Priority
PRIORITY_LOW: Priority
PRIORITY_NORMAL: Priority
PRIORITY_HIGH: Priority
REQUEST_KIND_UNSPECIFIED: RequestKind
REQUEST_KIND_CHAT: RequestKind
REQUEST_KIND_COMPLETION: RequestKind
REQUEST_KIND_EMBEDDING: RequestKind
TRAINING_STATE_UNSPECIFIED: TrainingState
TRAINING_STATE_QUEUED: TrainingState
TRAINING_STATE_RUNNING: TrainingState
TRAINING_STATE_SUCCEEDED: TrainingState
TRAINING_STATE_FAILED: TrainingState
TRAINING_STATE_CANCELLED: TrainingState
DEPLOYMENT_ACTION_UNSPECIFIED: DeploymentAction
DEPLOYMENT_ACTION_CANARY: DeploymentAction
DEPLOYMENT_ACTION_PROMOTE: DeploymentAction
DEPLOYMENT_ACTION_ROLLBACK: DeploymentAction
DEPLOYMENT_ACTION_RETIRE: DeploymentAction
MODEL_STATE_UNSPECIFIED: ModelState
MODEL_STATE_LOADING: ModelState
MODEL_STATE_READY: ModelState
MODEL_STATE_FAILED: ModelState
MODEL_STATE_UNLOADED: ModelState
ALERT_STATE_UNSPECIFIED: AlertState
ALERT_STATE_FIRING: AlertState
ALERT_STATE_RESOLVED: AlertState
INDEX_STATE_UNSPECIFIED: IndexState
INDEX_STATE_STARTED: IndexState
INDEX_STATE_INDEXED: IndexState
INDEX_STATE_UNCHANGED: IndexState
INDEX_STATE_DELETED: IndexState
INDEX_STATE_FAILED: IndexState

class Envelope(_message.Message):
    __slots__ = ("event_id", "occurred_at", "tenant", "schema_version", "producer", "correlation_id")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_FIELD_NUMBER: _ClassVar[int]
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    occurred_at: _timestamp_pb2.Timestamp
    tenant: str
    schema_version: int
    producer: str
    correlation_id: str
    def __init__(self, event_id: _Optional[str] = ..., occurred_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., tenant: _Optional[str] = ..., schema_version: _Optional[int] = ..., producer: _Optional[str] = ..., correlation_id: _Optional[str] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content", "name")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    name: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "seed", "stop", "max_tokens", "n", "max_tokens_cap", "ignore_eos")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_CAP_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    max_tokens: int
    n: int
    max_tokens_cap: int
    ignore_eos: bool
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., max_tokens: _Optional[int] = ..., n: _Optional[int] = ..., max_tokens_cap: _Optional[int] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class InferenceRequest(_message.Message):
    __slots__ = ("envelope", "request_id", "kind", "model", "model_version", "priority", "messages", "inputs", "sampling", "stream", "reply_topic", "deadline", "user", "api_key_id", "rag_collections", "acl_groups", "rag_top_k", "client_user")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    REPLY_TOPIC_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    API_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    RAG_COLLECTIONS_FIELD_NUMBER: _ClassVar[int]
    ACL_GROUPS_FIELD_NUMBER: _ClassVar[int]
    RAG_TOP_K_FIELD_NUMBER: _ClassVar[int]
    CLIENT_USER_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    request_id: str
    kind: RequestKind
    model: str
    model_version: str
    priority: Priority
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    inputs: _containers.RepeatedScalarFieldContainer[str]
    sampling: SamplingParams
    stream: bool
    reply_topic: str
    deadline: _timestamp_pb2.Timestamp
    user: str
    api_key_id: str
    rag_collections: _containers.RepeatedScalarFieldContainer[str]
    acl_groups: _containers.RepeatedScalarFieldContainer[str]
    rag_top_k: int
    client_user: str
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., request_id: _Optional[str] = ..., kind: _Optional[_Union[RequestKind, str]] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., priority: _Optional[_Union[Priority, str]] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., inputs: _Optional[_Iterable[str]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., stream: _Optional[bool] = ..., reply_topic: _Optional[str] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., user: _Optional[str] = ..., api_key_id: _Optional[str] = ..., rag_collections: _Optional[_Iterable[str]] = ..., acl_groups: _Optional[_Iterable[str]] = ..., rag_top_k: _Optional[int] = ..., client_user: _Optional[str] = ...) -> None: ...

class ReplyChunk(_message.Message):
    __slots__ = ("envelope", "request_id", "choice_index", "sequence", "delta", "run")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CHOICE_INDEX_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    request_id: str
    choice_index: int
    sequence: int
    delta: str
    run: str
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., request_id: _Optional[str] = ..., choice_index: _Optional[int] = ..., sequence: _Optional[int] = ..., delta: _Optional[str] = ..., run: _Optional[str] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("envelope", "request_id", "reason")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    request_id: str
    reason: str
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., request_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class Choice(_message.Message):
    __slots__ = ("index", "text", "finish_reason")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    index: int
    text: str
    finish_reason: str
    def __init__(self, index: _Optional[int] = ..., text: _Optional[str] = ..., finish_reason: _Optional[str] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("index", "values")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    index: int
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, index: _Optional[int] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class Citation(_message.Message):
    __slots__ = ("document_id", "title", "chunk_id", "collection", "score")
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    document_id: str
    title: str
    chunk_id: str
    collection: str
    score: float
    def __init__(self, document_id: _Optional[str] = ..., title: _Optional[str] = ..., chunk_id: _Optional[str] = ..., collection: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class ErrorInfo(_message.Message):
    __slots__ = ("type", "code", "message", "param")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PARAM_FIELD_NUMBER: _ClassVar[int]
    type: str
    code: str
    message: str
    param: str
    def __init__(self, type: _Optional[str] = ..., code: _Optional[str] = ..., message: _Optional[str] = ..., param: _Optional[str] = ...) -> None: ...

class FinalReply(_message.Message):
    __slots__ = ("envelope", "request_id", "model", "model_version", "choices", "embeddings", "usage", "citations", "error", "pool")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    request_id: str
    model: str
    model_version: str
    choices: _containers.RepeatedCompositeFieldContainer[Choice]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    usage: Usage
    citations: _containers.RepeatedCompositeFieldContainer[Citation]
    error: ErrorInfo
    pool: str
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., request_id: _Optional[str] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., choices: _Optional[_Iterable[_Union[Choice, _Mapping]]] = ..., embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., citations: _Optional[_Iterable[_Union[Citation, _Mapping]]] = ..., error: _Optional[_Union[ErrorInfo, _Mapping]] = ..., pool: _Optional[str] = ...) -> None: ...

class RequestRecord(_message.Message):
    __slots__ = ("kind", "messages", "inputs", "sampling", "priority", "source_address")
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    kind: RequestKind
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    inputs: _containers.RepeatedScalarFieldContainer[str]
    sampling: SamplingParams
    priority: Priority
    source_address: str
    def __init__(self, kind: _Optional[_Union[RequestKind, str]] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., inputs: _Optional[_Iterable[str]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., priority: _Optional[_Union[Priority, str]] = ..., source_address: _Optional[str] = ...) -> None: ...

class ResponseRecord(_message.Message):
    __slots__ = ("choices", "usage", "status_code", "error", "latency_us", "retrieved_chunk_ids")
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LATENCY_US_FIELD_NUMBER: _ClassVar[int]
    RETRIEVED_CHUNK_IDS_FIELD_NUMBER: _ClassVar[int]
    choices: _containers.RepeatedCompositeFieldContainer[Choice]
    usage: Usage
    status_code: int
    error: ErrorInfo
    latency_us: int
    retrieved_chunk_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, choices: _Optional[_Iterable[_Union[Choice, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., status_code: _Optional[int] = ..., error: _Optional[_Union[ErrorInfo, _Mapping]] = ..., latency_us: _Optional[int] = ..., retrieved_chunk_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class RoutingDecision(_message.Message):
    __slots__ = ("pool", "replica", "queue_wait_us", "cache", "attempt", "prompt", "prompt_restricted", "model_version", "release_arm")
    POOL_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    QUEUE_WAIT_US_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_RESTRICTED_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RELEASE_ARM_FIELD_NUMBER: _ClassVar[int]
    pool: str
    replica: str
    queue_wait_us: int
    cache: str
    attempt: int
    prompt: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    prompt_restricted: bool
    model_version: str
    release_arm: str
    def __init__(self, pool: _Optional[str] = ..., replica: _Optional[str] = ..., queue_wait_us: _Optional[int] = ..., cache: _Optional[str] = ..., attempt: _Optional[int] = ..., prompt: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., prompt_restricted: _Optional[bool] = ..., model_version: _Optional[str] = ..., release_arm: _Optional[str] = ...) -> None: ...

class PolicyDecision(_message.Message):
    __slots__ = ("allow", "reasons", "action", "resource", "roles")
    ALLOW_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    allow: bool
    reasons: _containers.RepeatedScalarFieldContainer[str]
    action: str
    resource: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, allow: _Optional[bool] = ..., reasons: _Optional[_Iterable[str]] = ..., action: _Optional[str] = ..., resource: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ...) -> None: ...

class ScalingRecord(_message.Message):
    __slots__ = ("deployment", "current_replicas", "target_replicas", "reason", "decision_id")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    CURRENT_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    TARGET_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    current_replicas: int
    target_replicas: int
    reason: str
    decision_id: str
    def __init__(self, deployment: _Optional[str] = ..., current_replicas: _Optional[int] = ..., target_replicas: _Optional[int] = ..., reason: _Optional[str] = ..., decision_id: _Optional[str] = ...) -> None: ...

class AuditEvent(_message.Message):
    __slots__ = ("envelope", "request_id", "api_key_id", "user", "model", "model_version", "request", "response", "routing", "policy", "scaling", "client_user")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    API_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    SCALING_FIELD_NUMBER: _ClassVar[int]
    CLIENT_USER_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    request_id: str
    api_key_id: str
    user: str
    model: str
    model_version: str
    request: RequestRecord
    response: ResponseRecord
    routing: RoutingDecision
    policy: PolicyDecision
    scaling: ScalingRecord
    client_user: str
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., request_id: _Optional[str] = ..., api_key_id: _Optional[str] = ..., user: _Optional[str] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., request: _Optional[_Union[RequestRecord, _Mapping]] = ..., response: _Optional[_Union[ResponseRecord, _Mapping]] = ..., routing: _Optional[_Union[RoutingDecision, _Mapping]] = ..., policy: _Optional[_Union[PolicyDecision, _Mapping]] = ..., scaling: _Optional[_Union[ScalingRecord, _Mapping]] = ..., client_user: _Optional[str] = ...) -> None: ...

class AuditCheckpoint(_message.Message):
    __slots__ = ("envelope", "log_id", "tree_size", "root_hash", "signed_at_ns", "key_id", "signature")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    LOG_ID_FIELD_NUMBER: _ClassVar[int]
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    ROOT_HASH_FIELD_NUMBER: _ClassVar[int]
    SIGNED_AT_NS_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    log_id: str
    tree_size: int
    root_hash: bytes
    signed_at_ns: int
    key_id: str
    signature: bytes
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., log_id: _Optional[str] = ..., tree_size: _Optional[int] = ..., root_hash: _Optional[bytes] = ..., signed_at_ns: _Optional[int] = ..., key_id: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class FeedbackEvent(_message.Message):
    __slots__ = ("envelope", "request_id", "user", "rating", "labels", "correction", "comment", "score", "api_key_id")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    RATING_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CORRECTION_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    API_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    request_id: str
    user: str
    rating: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    correction: str
    comment: str
    score: int
    api_key_id: str
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., request_id: _Optional[str] = ..., user: _Optional[str] = ..., rating: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ..., correction: _Optional[str] = ..., comment: _Optional[str] = ..., score: _Optional[int] = ..., api_key_id: _Optional[str] = ...) -> None: ...

class DatasetReady(_message.Message):
    __slots__ = ("envelope", "dataset_id", "uri", "examples", "sha256", "purpose")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    dataset_id: str
    uri: str
    examples: int
    sha256: str
    purpose: str
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., dataset_id: _Optional[str] = ..., uri: _Optional[str] = ..., examples: _Optional[int] = ..., sha256: _Optional[str] = ..., purpose: _Optional[str] = ...) -> None: ...

class TrainingJob(_message.Message):
    __slots__ = ("envelope", "job_id", "method", "base_model", "base_version", "dataset_id", "parameters", "training_file", "validation_file")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FILE_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FILE_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    job_id: str
    method: str
    base_model: str
    base_version: str
    dataset_id: str
    parameters: _containers.ScalarMap[str, str]
    training_file: str
    validation_file: str
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., job_id: _Optional[str] = ..., method: _Optional[str] = ..., base_model: _Optional[str] = ..., base_version: _Optional[str] = ..., dataset_id: _Optional[str] = ..., parameters: _Optional[_Mapping[str, str]] = ..., training_file: _Optional[str] = ..., validation_file: _Optional[str] = ...) -> None: ...

class TrainingProgress(_message.Message):
    __slots__ = ("envelope", "job_id", "state", "step", "total_steps", "epoch", "loss", "tokens_per_s", "eta_s", "fine_tuned_model", "error")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    ETA_S_FIELD_NUMBER: _ClassVar[int]
    FINE_TUNED_MODEL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    job_id: str
    state: TrainingState
    step: int
    total_steps: int
    epoch: float
    loss: float
    tokens_per_s: float
    eta_s: float
    fine_tuned_model: str
    error: str
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., job_id: _Optional[str] = ..., state: _Optional[_Union[TrainingState, str]] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., epoch: _Optional[float] = ..., loss: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., eta_s: _Optional[float] = ..., fine_tuned_model: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class ModelCandidate(_message.Message):
    __slots__ = ("envelope", "model", "version", "base_version", "artifact_uri", "job_id", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_URI_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    model: str
    version: str
    base_version: str
    artifact_uri: str
    job_id: str
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., model: _Optional[str] = ..., version: _Optional[str] = ..., base_version: _Optional[str] = ..., artifact_uri: _Optional[str] = ..., job_id: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ModelDeployment(_message.Message):
    __slots__ = ("envelope", "model", "version", "action", "traffic_percent", "pool", "reason", "release_id", "lease_s", "candidate_callers", "production_callers")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_PERCENT_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RELEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_CALLERS_FIELD_NUMBER: _ClassVar[int]
    PRODUCTION_CALLERS_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    model: str
    version: str
    action: DeploymentAction
    traffic_percent: int
    pool: str
    reason: str
    release_id: str
    lease_s: int
    candidate_callers: _containers.RepeatedScalarFieldContainer[str]
    production_callers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., model: _Optional[str] = ..., version: _Optional[str] = ..., action: _Optional[_Union[DeploymentAction, str]] = ..., traffic_percent: _Optional[int] = ..., pool: _Optional[str] = ..., reason: _Optional[str] = ..., release_id: _Optional[str] = ..., lease_s: _Optional[int] = ..., candidate_callers: _Optional[_Iterable[str]] = ..., production_callers: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("envelope", "model", "version", "pool", "state", "replicas", "detail", "deployment", "max_replicas", "running_replicas")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    model: str
    version: str
    pool: str
    state: ModelState
    replicas: int
    detail: str
    deployment: str
    max_replicas: int
    running_replicas: int
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., model: _Optional[str] = ..., version: _Optional[str] = ..., pool: _Optional[str] = ..., state: _Optional[_Union[ModelState, str]] = ..., replicas: _Optional[int] = ..., detail: _Optional[str] = ..., deployment: _Optional[str] = ..., max_replicas: _Optional[int] = ..., running_replicas: _Optional[int] = ...) -> None: ...

class OpsAlert(_message.Message):
    __slots__ = ("envelope", "alert_id", "rule", "state", "severity", "labels", "value", "threshold", "summary")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    ALERT_ID_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    alert_id: str
    rule: str
    state: AlertState
    severity: str
    labels: _containers.ScalarMap[str, str]
    value: float
    threshold: float
    summary: str
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., alert_id: _Optional[str] = ..., rule: _Optional[str] = ..., state: _Optional[_Union[AlertState, str]] = ..., severity: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., value: _Optional[float] = ..., threshold: _Optional[float] = ..., summary: _Optional[str] = ...) -> None: ...

class ScalingDecision(_message.Message):
    __slots__ = ("envelope", "deployment", "pool", "current_replicas", "target_replicas", "reason")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    CURRENT_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    TARGET_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    deployment: str
    pool: str
    current_replicas: int
    target_replicas: int
    reason: str
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., deployment: _Optional[str] = ..., pool: _Optional[str] = ..., current_replicas: _Optional[int] = ..., target_replicas: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class KbIngest(_message.Message):
    __slots__ = ("envelope", "document_id", "collection", "title", "content_type", "content", "acl", "metadata", "delete", "writer_groups", "writer_is_admin")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    ACL_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    DELETE_FIELD_NUMBER: _ClassVar[int]
    WRITER_GROUPS_FIELD_NUMBER: _ClassVar[int]
    WRITER_IS_ADMIN_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    document_id: str
    collection: str
    title: str
    content_type: str
    content: bytes
    acl: _containers.RepeatedScalarFieldContainer[str]
    metadata: _containers.ScalarMap[str, str]
    delete: bool
    writer_groups: _containers.RepeatedScalarFieldContainer[str]
    writer_is_admin: bool
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., document_id: _Optional[str] = ..., collection: _Optional[str] = ..., title: _Optional[str] = ..., content_type: _Optional[str] = ..., content: _Optional[bytes] = ..., acl: _Optional[_Iterable[str]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., delete: _Optional[bool] = ..., writer_groups: _Optional[_Iterable[str]] = ..., writer_is_admin: _Optional[bool] = ...) -> None: ...

class KbIndexed(_message.Message):
    __slots__ = ("envelope", "document_id", "collection", "state", "chunks", "content_sha256", "error")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    CONTENT_SHA256_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    document_id: str
    collection: str
    state: IndexState
    chunks: int
    content_sha256: str
    error: str
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., document_id: _Optional[str] = ..., collection: _Optional[str] = ..., state: _Optional[_Union[IndexState, str]] = ..., chunks: _Optional[int] = ..., content_sha256: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...
