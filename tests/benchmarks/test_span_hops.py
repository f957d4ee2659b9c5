"""The mesh benchmark's per-hop breakdown, on spans made up for the purpose."""

from __future__ import annotations

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from meshbench.span_hops import SERVER_KIND, SpanCollector, SpanRecord, breakdown, decode

MS = 1_000_000


def trace(trace_id: bytes, t0: int, shift: int = 0) -> list[SpanRecord]:
    """One request: 1 ms admission, 2 ms request hop, 5 ms replica, 3 ms reply hop."""

    def span(service: str, name: str, start: float, end: float, kind: int = 1) -> SpanRecord:
        return SpanRecord(service, name, kind, trace_id, t0 + int(start * MS), t0 + int(end * MS))

    return [
        span("gateway", "POST /v1/chat/completions", 0, 14 + shift, SERVER_KIND),
        span("gateway", "llm.requests.normal publish", 1, 1.1),
        span("gateway", "audit.events publish", 1, 1.1),
        span("router", "llm.requests.normal process", 3, 12),
        span("router", "inference call", 3.5, 8.5),
        span("router", "llm.replies publish", 8.6, 8.7),  # a chunk
        span("router", "llm.replies publish", 9, 9.1),  # the final reply
        span("gateway", "llm.replies process", 10, 10.1),
        span("gateway", "llm.replies process", 12, 12.1),
    ]


def test_each_hop_is_cut_where_the_spans_say() -> None:
    rows, complete = breakdown(trace(b"a" * 16, 0) + trace(b"b" * 16, 10**9, shift=2))
    assert complete == 2
    p50 = {row.hop: round(row.p50_ms, 3) for row in rows}
    assert p50["gateway: parse, authenticate, policy, limits"] == 1
    assert p50["bus: request publish -> router handler"] == 2
    assert p50["router: handler -> replica call"] == 0.5
    assert p50["replica call (the backend)"] == 5
    assert p50["router: replica done -> reply publish"] == pytest.approx(0.5)
    assert p50["bus: reply publish -> gateway handler"] == 3
    assert p50["gateway: reply -> answer (response record durable)"] == 3  # 2 and 4
    assert p50["whole trace (gateway span)"] == 15


def test_a_trace_missing_a_hop_is_left_out() -> None:
    partial = [s for s in trace(b"c" * 16, 0) if s.service != "router"]
    rows, complete = breakdown(partial)
    assert (rows, complete) == ([], 0)


def test_spans_decode_from_the_telemetry_topics_otlp() -> None:
    request = ExportTraceServiceRequest()
    resource = request.resource_spans.add()
    attribute = resource.resource.attributes.add()
    attribute.key, attribute.value.string_value = "service.name", "router"
    otlp = resource.scope_spans.add().spans.add()
    otlp.name, otlp.kind, otlp.trace_id = "inference call", 3, b"t" * 16
    otlp.start_time_unix_nano, otlp.end_time_unix_nano = 5, 9
    (span,) = decode(request.SerializeToString())
    assert span == SpanRecord("router", "inference call", 3, b"t" * 16, 5, 9)


def test_the_collector_keeps_whole_traces_of_the_windows_only() -> None:
    collector = SpanCollector("127.0.0.1:1")
    collector.spans = trace(b"in" * 8, 100 * MS) + trace(b"out" * 5 + b"!", 500 * MS)
    kept = collector.within([(50 * MS, 200 * MS)])
    assert {s.trace_id for s in kept} == {b"in" * 8}
    assert len(kept) == 9


def test_a_streams_trace_has_no_answer_hop() -> None:
    # the gateway's span of a stream ends when the response starts, before the reply
    spans = [
        SpanRecord(s.service, s.name, s.kind, s.trace_id, s.start_ns, 5 * MS)
        if s.kind == SERVER_KIND
        else s
        for s in trace(b"s" * 16, 0)
    ]
    rows, complete = breakdown(spans)
    hops = {row.hop for row in rows}
    assert complete == 1
    assert "bus: reply publish -> gateway handler" in hops
    assert "gateway: reply -> answer (response record durable)" not in hops
    assert "whole trace (gateway span)" not in hops
