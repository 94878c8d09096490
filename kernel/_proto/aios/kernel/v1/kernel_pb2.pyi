from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    AUTOMATED: _ClassVar[Outcome]
    ESCALATED: _ClassVar[Outcome]
    FALLBACK: _ClassVar[Outcome]
    REVIEWED: _ClassVar[Outcome]

class TaskState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_STATE_UNSPECIFIED: _ClassVar[TaskState]
    QUEUED: _ClassVar[TaskState]
    RUNNING: _ClassVar[TaskState]
    WAITING_FOR_REVIEW: _ClassVar[TaskState]
    SUCCEEDED: _ClassVar[TaskState]
    FAILED: _ClassVar[TaskState]
    CANCELLED: _ClassVar[TaskState]

class AuditKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIT_KIND_UNSPECIFIED: _ClassVar[AuditKind]
    DECISION: _ClassVar[AuditKind]
    REVIEW_RESOLUTION: _ClassVar[AuditKind]
    MODEL_DEPLOY: _ClassVar[AuditKind]
    MODEL_UNDEPLOY: _ClassVar[AuditKind]
    ROUTE_CHANGE: _ClassVar[AuditKind]
    POLICY_CHANGE: _ClassVar[AuditKind]
    PERMISSION_DENIED: _ClassVar[AuditKind]
    CONFIG_CHANGE: _ClassVar[AuditKind]
OUTCOME_UNSPECIFIED: Outcome
AUTOMATED: Outcome
ESCALATED: Outcome
FALLBACK: Outcome
REVIEWED: Outcome
TASK_STATE_UNSPECIFIED: TaskState
QUEUED: TaskState
RUNNING: TaskState
WAITING_FOR_REVIEW: TaskState
SUCCEEDED: TaskState
FAILED: TaskState
CANCELLED: TaskState
AUDIT_KIND_UNSPECIFIED: AuditKind
DECISION: AuditKind
REVIEW_RESOLUTION: AuditKind
MODEL_DEPLOY: AuditKind
MODEL_UNDEPLOY: AuditKind
ROUTE_CHANGE: AuditKind
POLICY_CHANGE: AuditKind
PERMISSION_DENIED: AuditKind
CONFIG_CHANGE: AuditKind

class Value(_message.Message):
    __slots__ = ("string_value", "number_value", "int_value", "bool_value")
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    NUMBER_VALUE_FIELD_NUMBER: _ClassVar[int]
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    string_value: str
    number_value: float
    int_value: int
    bool_value: bool
    def __init__(self, string_value: _Optional[str] = ..., number_value: _Optional[float] = ..., int_value: _Optional[int] = ..., bool_value: _Optional[bool] = ...) -> None: ...

class DecisionRequest(_message.Message):
    __slots__ = ("pipeline", "tenant", "request_id", "idempotency_key", "fields", "text_fields", "priority", "timeout_ms")
    class FieldsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    class TextFieldsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELDS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    pipeline: str
    tenant: str
    request_id: str
    idempotency_key: str
    fields: _containers.MessageMap[str, Value]
    text_fields: _containers.ScalarMap[str, str]
    priority: int
    timeout_ms: int
    def __init__(self, pipeline: _Optional[str] = ..., tenant: _Optional[str] = ..., request_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., fields: _Optional[_Mapping[str, Value]] = ..., text_fields: _Optional[_Mapping[str, str]] = ..., priority: _Optional[int] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class Reason(_message.Message):
    __slots__ = ("rule_id", "description")
    RULE_ID_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    rule_id: str
    description: str
    def __init__(self, rule_id: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class ModelProvenance(_message.Message):
    __slots__ = ("model_name", "model_version", "route_arm", "confidence", "class_scores", "model_sha256")
    class ClassScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUTE_ARM_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    CLASS_SCORES_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    route_arm: str
    confidence: float
    class_scores: _containers.ScalarMap[str, float]
    model_sha256: str
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., route_arm: _Optional[str] = ..., confidence: _Optional[float] = ..., class_scores: _Optional[_Mapping[str, float]] = ..., model_sha256: _Optional[str] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("request_id", "action", "reasons", "outcome", "model", "input_hash", "policy_name", "policy_hash", "review_id", "phase_timings_ns", "audit_sequence", "audit_hash", "pipeline", "pipeline_version", "tenant", "idempotency_key", "replayed", "policy_version", "escalation_reasons", "error_code", "error_message", "links_to_audit_sequence", "score_adjustment", "retry_after_ms", "not_decided")
    class PhaseTimingsNsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_HASH_FIELD_NUMBER: _ClassVar[int]
    POLICY_NAME_FIELD_NUMBER: _ClassVar[int]
    POLICY_HASH_FIELD_NUMBER: _ClassVar[int]
    REVIEW_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_TIMINGS_NS_FIELD_NUMBER: _ClassVar[int]
    AUDIT_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    AUDIT_HASH_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    ESCALATION_REASONS_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LINKS_TO_AUDIT_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SCORE_ADJUSTMENT_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    NOT_DECIDED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    action: str
    reasons: _containers.RepeatedCompositeFieldContainer[Reason]
    outcome: Outcome
    model: ModelProvenance
    input_hash: str
    policy_name: str
    policy_hash: str
    review_id: str
    phase_timings_ns: _containers.ScalarMap[str, int]
    audit_sequence: int
    audit_hash: str
    pipeline: str
    pipeline_version: str
    tenant: str
    idempotency_key: str
    replayed: bool
    policy_version: str
    escalation_reasons: _containers.RepeatedScalarFieldContainer[str]
    error_code: str
    error_message: str
    links_to_audit_sequence: int
    score_adjustment: float
    retry_after_ms: int
    not_decided: bool
    def __init__(self, request_id: _Optional[str] = ..., action: _Optional[str] = ..., reasons: _Optional[_Iterable[_Union[Reason, _Mapping]]] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., model: _Optional[_Union[ModelProvenance, _Mapping]] = ..., input_hash: _Optional[str] = ..., policy_name: _Optional[str] = ..., policy_hash: _Optional[str] = ..., review_id: _Optional[str] = ..., phase_timings_ns: _Optional[_Mapping[str, int]] = ..., audit_sequence: _Optional[int] = ..., audit_hash: _Optional[str] = ..., pipeline: _Optional[str] = ..., pipeline_version: _Optional[str] = ..., tenant: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., replayed: _Optional[bool] = ..., policy_version: _Optional[str] = ..., escalation_reasons: _Optional[_Iterable[str]] = ..., error_code: _Optional[str] = ..., error_message: _Optional[str] = ..., links_to_audit_sequence: _Optional[int] = ..., score_adjustment: _Optional[float] = ..., retry_after_ms: _Optional[int] = ..., not_decided: _Optional[bool] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("task_id", "state", "request", "decision", "error", "created_unix_ns", "updated_unix_ns", "attempts", "review_id", "history", "audit_from_sequence", "replayed", "next_attempt_unix_ns")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    REVIEW_ID_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    AUDIT_FROM_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    NEXT_ATTEMPT_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    state: TaskState
    request: DecisionRequest
    decision: Decision
    error: str
    created_unix_ns: int
    updated_unix_ns: int
    attempts: int
    review_id: str
    history: _containers.RepeatedCompositeFieldContainer[TaskTransition]
    audit_from_sequence: int
    replayed: bool
    next_attempt_unix_ns: int
    def __init__(self, task_id: _Optional[str] = ..., state: _Optional[_Union[TaskState, str]] = ..., request: _Optional[_Union[DecisionRequest, _Mapping]] = ..., decision: _Optional[_Union[Decision, _Mapping]] = ..., error: _Optional[str] = ..., created_unix_ns: _Optional[int] = ..., updated_unix_ns: _Optional[int] = ..., attempts: _Optional[int] = ..., review_id: _Optional[str] = ..., history: _Optional[_Iterable[_Union[TaskTransition, _Mapping]]] = ..., audit_from_sequence: _Optional[int] = ..., replayed: _Optional[bool] = ..., next_attempt_unix_ns: _Optional[int] = ...) -> None: ...

class TaskTransition(_message.Message):
    __slots__ = ("state", "at_unix_ns", "attempt", "detail")
    STATE_FIELD_NUMBER: _ClassVar[int]
    AT_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    state: TaskState
    at_unix_ns: int
    attempt: int
    detail: str
    def __init__(self, state: _Optional[_Union[TaskState, str]] = ..., at_unix_ns: _Optional[int] = ..., attempt: _Optional[int] = ..., detail: _Optional[str] = ...) -> None: ...

class StartTaskRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: DecisionRequest
    def __init__(self, request: _Optional[_Union[DecisionRequest, _Mapping]] = ...) -> None: ...

class TaskRef(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class ListTasksRequest(_message.Message):
    __slots__ = ("tenant", "states", "page_size", "page_token")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    states: _containers.RepeatedScalarFieldContainer[TaskState]
    page_size: int
    page_token: str
    def __init__(self, tenant: _Optional[str] = ..., states: _Optional[_Iterable[_Union[TaskState, str]]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListTasksResponse(_message.Message):
    __slots__ = ("tasks", "next_page_token")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[Task]
    next_page_token: str
    def __init__(self, tasks: _Optional[_Iterable[_Union[Task, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class Review(_message.Message):
    __slots__ = ("review_id", "request_id", "pipeline", "tenant", "state", "proposed", "claimed_by", "lease_expires_unix_ns", "sla_deadline_unix_ns", "created_unix_ns", "sla_missed", "resolved_action", "resolved_by", "comment", "resolved_unix_ns", "resolution", "task_id", "request", "actions", "claimed_unix_ns", "defaults", "text_digests", "sequence")
    class DefaultsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    class TextDigestsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REVIEW_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROPOSED_FIELD_NUMBER: _ClassVar[int]
    CLAIMED_BY_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    SLA_DEADLINE_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    SLA_MISSED_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_ACTION_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_BY_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    CLAIMED_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    TEXT_DIGESTS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    review_id: str
    request_id: str
    pipeline: str
    tenant: str
    state: str
    proposed: Decision
    claimed_by: str
    lease_expires_unix_ns: int
    sla_deadline_unix_ns: int
    created_unix_ns: int
    sla_missed: bool
    resolved_action: str
    resolved_by: str
    comment: str
    resolved_unix_ns: int
    resolution: Decision
    task_id: str
    request: DecisionRequest
    actions: _containers.RepeatedScalarFieldContainer[str]
    claimed_unix_ns: int
    defaults: _containers.MessageMap[str, Value]
    text_digests: _containers.ScalarMap[str, str]
    sequence: int
    def __init__(self, review_id: _Optional[str] = ..., request_id: _Optional[str] = ..., pipeline: _Optional[str] = ..., tenant: _Optional[str] = ..., state: _Optional[str] = ..., proposed: _Optional[_Union[Decision, _Mapping]] = ..., claimed_by: _Optional[str] = ..., lease_expires_unix_ns: _Optional[int] = ..., sla_deadline_unix_ns: _Optional[int] = ..., created_unix_ns: _Optional[int] = ..., sla_missed: _Optional[bool] = ..., resolved_action: _Optional[str] = ..., resolved_by: _Optional[str] = ..., comment: _Optional[str] = ..., resolved_unix_ns: _Optional[int] = ..., resolution: _Optional[_Union[Decision, _Mapping]] = ..., task_id: _Optional[str] = ..., request: _Optional[_Union[DecisionRequest, _Mapping]] = ..., actions: _Optional[_Iterable[str]] = ..., claimed_unix_ns: _Optional[int] = ..., defaults: _Optional[_Mapping[str, Value]] = ..., text_digests: _Optional[_Mapping[str, str]] = ..., sequence: _Optional[int] = ...) -> None: ...

class ListReviewsRequest(_message.Message):
    __slots__ = ("pipeline", "tenant", "state", "page_size", "page_token")
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    pipeline: str
    tenant: str
    state: str
    page_size: int
    page_token: str
    def __init__(self, pipeline: _Optional[str] = ..., tenant: _Optional[str] = ..., state: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListReviewsResponse(_message.Message):
    __slots__ = ("reviews", "next_page_token", "sla_missed")
    REVIEWS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SLA_MISSED_FIELD_NUMBER: _ClassVar[int]
    reviews: _containers.RepeatedCompositeFieldContainer[Review]
    next_page_token: str
    sla_missed: int
    def __init__(self, reviews: _Optional[_Iterable[_Union[Review, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., sla_missed: _Optional[int] = ...) -> None: ...

class ClaimReviewRequest(_message.Message):
    __slots__ = ("review_id", "reviewer", "lease_seconds")
    REVIEW_ID_FIELD_NUMBER: _ClassVar[int]
    REVIEWER_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    review_id: str
    reviewer: str
    lease_seconds: int
    def __init__(self, review_id: _Optional[str] = ..., reviewer: _Optional[str] = ..., lease_seconds: _Optional[int] = ...) -> None: ...

class ResolveReviewRequest(_message.Message):
    __slots__ = ("review_id", "reviewer", "action", "comment")
    REVIEW_ID_FIELD_NUMBER: _ClassVar[int]
    REVIEWER_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    review_id: str
    reviewer: str
    action: str
    comment: str
    def __init__(self, review_id: _Optional[str] = ..., reviewer: _Optional[str] = ..., action: _Optional[str] = ..., comment: _Optional[str] = ...) -> None: ...

class ReviewRef(_message.Message):
    __slots__ = ("review_id",)
    REVIEW_ID_FIELD_NUMBER: _ClassVar[int]
    review_id: str
    def __init__(self, review_id: _Optional[str] = ...) -> None: ...

class WatchReviewsRequest(_message.Message):
    __slots__ = ("pipeline", "tenant", "include_open", "updates", "from_sequence")
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_OPEN_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    FROM_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    pipeline: str
    tenant: str
    include_open: bool
    updates: bool
    from_sequence: int
    def __init__(self, pipeline: _Optional[str] = ..., tenant: _Optional[str] = ..., include_open: _Optional[bool] = ..., updates: _Optional[bool] = ..., from_sequence: _Optional[int] = ...) -> None: ...

class ClaimNextReviewRequest(_message.Message):
    __slots__ = ("pipeline", "tenant", "reviewer", "lease_seconds")
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    REVIEWER_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    pipeline: str
    tenant: str
    reviewer: str
    lease_seconds: int
    def __init__(self, pipeline: _Optional[str] = ..., tenant: _Optional[str] = ..., reviewer: _Optional[str] = ..., lease_seconds: _Optional[int] = ...) -> None: ...

class AuditRecord(_message.Message):
    __slots__ = ("sequence", "kind", "prev_hash", "hash", "payload", "time_unix_ns", "principal", "tenant", "request_id", "idempotency_key", "pipeline", "pipeline_version", "decision", "inputs", "model_outputs", "links_to", "has_link", "task_id", "defaulted_fields", "request_hash")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    class ModelOutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PREV_HASH_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    LINKS_TO_FIELD_NUMBER: _ClassVar[int]
    HAS_LINK_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    DEFAULTED_FIELDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_HASH_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    kind: AuditKind
    prev_hash: bytes
    hash: bytes
    payload: bytes
    time_unix_ns: int
    principal: str
    tenant: str
    request_id: str
    idempotency_key: str
    pipeline: str
    pipeline_version: str
    decision: Decision
    inputs: _containers.MessageMap[str, Value]
    model_outputs: _containers.ScalarMap[str, float]
    links_to: int
    has_link: bool
    task_id: str
    defaulted_fields: _containers.RepeatedScalarFieldContainer[str]
    request_hash: bytes
    def __init__(self, sequence: _Optional[int] = ..., kind: _Optional[_Union[AuditKind, str]] = ..., prev_hash: _Optional[bytes] = ..., hash: _Optional[bytes] = ..., payload: _Optional[bytes] = ..., time_unix_ns: _Optional[int] = ..., principal: _Optional[str] = ..., tenant: _Optional[str] = ..., request_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., pipeline: _Optional[str] = ..., pipeline_version: _Optional[str] = ..., decision: _Optional[_Union[Decision, _Mapping]] = ..., inputs: _Optional[_Mapping[str, Value]] = ..., model_outputs: _Optional[_Mapping[str, float]] = ..., links_to: _Optional[int] = ..., has_link: _Optional[bool] = ..., task_id: _Optional[str] = ..., defaulted_fields: _Optional[_Iterable[str]] = ..., request_hash: _Optional[bytes] = ...) -> None: ...

class Checkpoint(_message.Message):
    __slots__ = ("tree_size", "root_hash", "time_unix_ns", "signature", "key_id")
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    ROOT_HASH_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    tree_size: int
    root_hash: bytes
    time_unix_ns: int
    signature: bytes
    key_id: str
    def __init__(self, tree_size: _Optional[int] = ..., root_hash: _Optional[bytes] = ..., time_unix_ns: _Optional[int] = ..., signature: _Optional[bytes] = ..., key_id: _Optional[str] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StreamAuditRequest(_message.Message):
    __slots__ = ("from_sequence", "follow", "tenant", "pipeline", "kind", "since_unix_ns", "until_unix_ns")
    FROM_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SINCE_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    UNTIL_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    from_sequence: int
    follow: bool
    tenant: str
    pipeline: str
    kind: AuditKind
    since_unix_ns: int
    until_unix_ns: int
    def __init__(self, from_sequence: _Optional[int] = ..., follow: _Optional[bool] = ..., tenant: _Optional[str] = ..., pipeline: _Optional[str] = ..., kind: _Optional[_Union[AuditKind, str]] = ..., since_unix_ns: _Optional[int] = ..., until_unix_ns: _Optional[int] = ...) -> None: ...

class StreamAuditBatchesRequest(_message.Message):
    __slots__ = ("query", "max_records")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    MAX_RECORDS_FIELD_NUMBER: _ClassVar[int]
    query: StreamAuditRequest
    max_records: int
    def __init__(self, query: _Optional[_Union[StreamAuditRequest, _Mapping]] = ..., max_records: _Optional[int] = ...) -> None: ...

class AuditRecordBatch(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[AuditRecord]
    def __init__(self, records: _Optional[_Iterable[_Union[AuditRecord, _Mapping]]] = ...) -> None: ...

class InclusionProofRequest(_message.Message):
    __slots__ = ("sequence", "tree_size")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    tree_size: int
    def __init__(self, sequence: _Optional[int] = ..., tree_size: _Optional[int] = ...) -> None: ...

class ConsistencyProofRequest(_message.Message):
    __slots__ = ("old_size", "new_size")
    OLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    NEW_SIZE_FIELD_NUMBER: _ClassVar[int]
    old_size: int
    new_size: int
    def __init__(self, old_size: _Optional[int] = ..., new_size: _Optional[int] = ...) -> None: ...

class Proof(_message.Message):
    __slots__ = ("tree_size", "hashes", "root", "leaf_index", "leaf_hash", "old_size", "old_root")
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    ROOT_FIELD_NUMBER: _ClassVar[int]
    LEAF_INDEX_FIELD_NUMBER: _ClassVar[int]
    LEAF_HASH_FIELD_NUMBER: _ClassVar[int]
    OLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    OLD_ROOT_FIELD_NUMBER: _ClassVar[int]
    tree_size: int
    hashes: _containers.RepeatedScalarFieldContainer[bytes]
    root: bytes
    leaf_index: int
    leaf_hash: bytes
    old_size: int
    old_root: bytes
    def __init__(self, tree_size: _Optional[int] = ..., hashes: _Optional[_Iterable[bytes]] = ..., root: _Optional[bytes] = ..., leaf_index: _Optional[int] = ..., leaf_hash: _Optional[bytes] = ..., old_size: _Optional[int] = ..., old_root: _Optional[bytes] = ...) -> None: ...

class PublicKeyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PublicKey(_message.Message):
    __slots__ = ("algorithm", "key")
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    algorithm: str
    key: bytes
    def __init__(self, algorithm: _Optional[str] = ..., key: _Optional[bytes] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelSummary(_message.Message):
    __slots__ = ("name", "versions", "state", "provider", "queued_requests", "running_batches", "scheduler")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_BATCHES_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    name: str
    versions: _containers.RepeatedScalarFieldContainer[str]
    state: str
    provider: str
    queued_requests: int
    running_batches: int
    scheduler: SchedulerCounters
    def __init__(self, name: _Optional[str] = ..., versions: _Optional[_Iterable[str]] = ..., state: _Optional[str] = ..., provider: _Optional[str] = ..., queued_requests: _Optional[int] = ..., running_batches: _Optional[int] = ..., scheduler: _Optional[_Union[SchedulerCounters, _Mapping]] = ...) -> None: ...

class SchedulerCounters(_message.Message):
    __slots__ = ("submitted", "rejected_queue_full", "rejected_tenant_full", "rejected_deadline", "expired", "cancelled", "batches", "rows", "fit_ns_per_row", "fit_ns_fixed", "service_stretch", "expired_predicted", "expired_before_queue", "rejected_busy", "finished_late")
    SUBMITTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_QUEUE_FULL_FIELD_NUMBER: _ClassVar[int]
    REJECTED_TENANT_FULL_FIELD_NUMBER: _ClassVar[int]
    REJECTED_DEADLINE_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    FIT_NS_PER_ROW_FIELD_NUMBER: _ClassVar[int]
    FIT_NS_FIXED_FIELD_NUMBER: _ClassVar[int]
    SERVICE_STRETCH_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_PREDICTED_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_BEFORE_QUEUE_FIELD_NUMBER: _ClassVar[int]
    REJECTED_BUSY_FIELD_NUMBER: _ClassVar[int]
    FINISHED_LATE_FIELD_NUMBER: _ClassVar[int]
    submitted: int
    rejected_queue_full: int
    rejected_tenant_full: int
    rejected_deadline: int
    expired: int
    cancelled: int
    batches: int
    rows: int
    fit_ns_per_row: float
    fit_ns_fixed: float
    service_stretch: float
    expired_predicted: int
    expired_before_queue: int
    rejected_busy: int
    finished_late: int
    def __init__(self, submitted: _Optional[int] = ..., rejected_queue_full: _Optional[int] = ..., rejected_tenant_full: _Optional[int] = ..., rejected_deadline: _Optional[int] = ..., expired: _Optional[int] = ..., cancelled: _Optional[int] = ..., batches: _Optional[int] = ..., rows: _Optional[int] = ..., fit_ns_per_row: _Optional[float] = ..., fit_ns_fixed: _Optional[float] = ..., service_stretch: _Optional[float] = ..., expired_predicted: _Optional[int] = ..., expired_before_queue: _Optional[int] = ..., rejected_busy: _Optional[int] = ..., finished_late: _Optional[int] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelSummary]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelSummary, _Mapping]]] = ...) -> None: ...

class UploadPipelineRequest(_message.Message):
    __slots__ = ("pipeline_toml", "policy_toml")
    PIPELINE_TOML_FIELD_NUMBER: _ClassVar[int]
    POLICY_TOML_FIELD_NUMBER: _ClassVar[int]
    pipeline_toml: bytes
    policy_toml: bytes
    def __init__(self, pipeline_toml: _Optional[bytes] = ..., policy_toml: _Optional[bytes] = ...) -> None: ...

class PipelineInfo(_message.Message):
    __slots__ = ("name", "version", "hash", "model", "policy_name", "policy_version", "policy_hash", "fields", "model_version", "decisions", "unavailable_reason", "warnings")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    POLICY_NAME_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    POLICY_HASH_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_REASON_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    hash: str
    model: str
    policy_name: str
    policy_version: str
    policy_hash: str
    fields: _containers.RepeatedScalarFieldContainer[str]
    model_version: str
    decisions: DecisionCounters
    unavailable_reason: str
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., hash: _Optional[str] = ..., model: _Optional[str] = ..., policy_name: _Optional[str] = ..., policy_version: _Optional[str] = ..., policy_hash: _Optional[str] = ..., fields: _Optional[_Iterable[str]] = ..., model_version: _Optional[str] = ..., decisions: _Optional[_Union[DecisionCounters, _Mapping]] = ..., unavailable_reason: _Optional[str] = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...

class DecisionCounters(_message.Message):
    __slots__ = ("automated", "escalated", "fallback", "failed", "late")
    AUTOMATED_FIELD_NUMBER: _ClassVar[int]
    ESCALATED_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    LATE_FIELD_NUMBER: _ClassVar[int]
    automated: int
    escalated: int
    fallback: int
    failed: int
    late: int
    def __init__(self, automated: _Optional[int] = ..., escalated: _Optional[int] = ..., fallback: _Optional[int] = ..., failed: _Optional[int] = ..., late: _Optional[int] = ...) -> None: ...

class ListPipelinesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPipelinesResponse(_message.Message):
    __slots__ = ("pipelines", "refused")
    class RefusedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PIPELINES_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    pipelines: _containers.RepeatedCompositeFieldContainer[PipelineInfo]
    refused: _containers.ScalarMap[str, str]
    def __init__(self, pipelines: _Optional[_Iterable[_Union[PipelineInfo, _Mapping]]] = ..., refused: _Optional[_Mapping[str, str]] = ...) -> None: ...
