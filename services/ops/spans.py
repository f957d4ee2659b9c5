"""Answers read from OpenTelemetry spans: what the ops service's SLIs are computed from.

The gateway ends every answer with a span named ``{operation} {model}`` (GenAI's span
convention) that holds the operation, the model, the tenant, the tokens, the time to the
first token and the error, if any (:mod:`services.gateway.metrics`). This module finds
those spans in an OTLP ``ExportTraceServiceRequest`` (the records of ``telemetry.spans``)
and turns each into an :class:`Answer`; every other span is skipped. No I/O.

A record that is not OTLP is :class:`NotSpans`: the topic is internal, but its
consumer still treats each record as untrusted input: an operation outside GenAI's three is
skipped, so is a duration below 0 or over a day; a first-token time counts only when it is
finite and within the answer; token counts and statuses outside their ranges read as 0 and
200. (What a span may claim within those bounds is trusted: anything that can write to the
topic can make answers up; see the README on topic ACLs.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

ANSWER_SERVICE = "gateway"
MAX_LABEL = 128
OPERATIONS = frozenset({"chat", "text_completion", "embeddings"})
MAX_SECONDS = 24 * 3600.0  # longer than any deadline: a bigger duration is not an answer's
MAX_TOKENS = 10_000_000


class NotSpans(ValueError):
    """The record is not an OTLP ExportTraceServiceRequest."""


@dataclass(frozen=True)
class Answer:
    """One answer as the gateway saw it."""

    at_s: float  # its end, seconds since the epoch
    operation: str
    model: str
    tenant: str
    seconds: float
    first_token_s: float | None
    input_tokens: int
    output_tokens: int
    error: str | None
    status: int = 200
    model_version: str = "unknown"
    pool: str = "unknown"

    @property
    def failed(self) -> bool:
        """A failure of the mesh (a 5xx; its error rate), not of the client (a 4xx, or 499:
        it went away)."""
        return self.status >= 500


def answers(payload: bytes) -> Iterator[Answer]:
    """The answers in one ``telemetry.spans`` record.

    Raises:
        NotSpans: the bytes are not an ExportTraceServiceRequest.
    """
    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(payload)
    except DecodeError as error:
        raise NotSpans(f"not an OTLP trace export: {error}") from None
    for resource_spans in request.resource_spans:
        service = _attributes(resource_spans.resource.attributes).get("service.name")
        if service != ANSWER_SERVICE:
            continue
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                attributes = _attributes(span.attributes)
                operation = attributes.get("gen_ai.operation.name")
                if operation not in OPERATIONS or span.end_time_unix_nano == 0:
                    continue
                seconds = (span.end_time_unix_nano - span.start_time_unix_nano) / 1e9
                if not 0 <= seconds <= MAX_SECONDS:
                    continue  # not a duration any answer has: a broken or forged span
                yield _answer(span.end_time_unix_nano, seconds, str(operation), attributes)


def _answer(end_ns: int, seconds: float, operation: str, attributes: dict[str, object]) -> Answer:
    first = attributes.get("meshllm.time_to_first_token_s")
    first_token_s = None  # only a finite time within the answer's own
    if isinstance(first, int | float) and math.isfinite(first) and 0 <= first <= seconds:
        first_token_s = float(first)
    status = _count(attributes.get("http.response.status_code"))
    return Answer(
        at_s=end_ns / 1e9,
        operation=operation,
        model=_text(attributes.get("gen_ai.request.model"), "unknown"),
        tenant=_text(attributes.get("meshllm.tenant"), "anonymous"),
        seconds=seconds,
        first_token_s=first_token_s,
        input_tokens=_count(attributes.get("gen_ai.usage.input_tokens")),
        output_tokens=_count(attributes.get("gen_ai.usage.output_tokens")),
        error=_text(attributes.get("error.type"), "") or None,
        model_version=_text(attributes.get("meshllm.model.version"), "unknown"),
        pool=_text(attributes.get("meshllm.pool"), "unknown"),
        status=status if 100 <= status <= 599 else 200,
    )


def _text(value: object, default: str) -> str:
    return value[:MAX_LABEL] if isinstance(value, str) and value else default


def _count(value: object) -> int:
    return value if isinstance(value, int) and 0 <= value <= MAX_TOKENS else 0


def _attributes(pairs: Iterable[KeyValue]) -> dict[str, object]:
    return {pair.key: _value(pair.value) for pair in pairs}


def _value(value: AnyValue) -> object:
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind == "int_value":
        return value.int_value
    if kind == "double_value":
        return value.double_value
    if kind == "bool_value":
        return value.bool_value
    return None
