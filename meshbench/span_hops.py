"""Where a request's time goes in the mesh, read from the spans the services export.

Every service publishes its finished spans to ``telemetry.spans`` (OTLP protobuf). For
one request they form a trace rooted at the gateway's SERVER span::

    gateway  POST /v1/chat/completions ─────────────────────────────────────────┐
    gateway    llm.requests.<priority> publish                                  │
    router       llm.requests.<priority> process                                │
    router         inference call (the replica)                                 │
    router         llm.replies publish (chunks ..., then the final reply)       │
    gateway          llm.replies process (each reply event)                     │
    gateway    audit.events publish (the response record) ... answer ───────────┘

:func:`breakdown` cuts each trace at those points into the hops below and returns
p50/p99 per hop, all clocks being this machine's. Time before the gateway's span starts
(the client, the HTTP server) is outside the trace; the benchmark reports it as the
difference between what the client measured and the trace's root.
"""

from __future__ import annotations

import asyncio
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

SERVER_KIND = 2  # opentelemetry.proto.trace.v1.Span.SPAN_KIND_SERVER

HOPS: tuple[tuple[str, str], ...] = (
    ("gateway: parse, authenticate, policy, limits", "admission"),
    ("bus: request publish -> router handler", "request_hop"),
    ("router: handler -> replica call", "to_replica"),
    ("replica call (the backend)", "replica"),
    ("router: replica done -> reply publish", "reply_publish"),
    ("bus: reply publish -> gateway handler", "reply_hop"),
    ("gateway: reply -> answer (response record durable)", "answer"),
    ("whole trace (gateway span)", "total"),
)


@dataclass(frozen=True)
class SpanRecord:
    service: str
    name: str
    kind: int
    trace_id: bytes
    start_ns: int
    end_ns: int


def decode(payload: bytes) -> list[SpanRecord]:
    """The spans of one ``telemetry.spans`` record (none when it is not OTLP)."""
    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(payload)
    except DecodeError:
        return []
    spans = []
    for resource in request.resource_spans:
        service = next(
            (a.value.string_value for a in resource.resource.attributes if a.key == "service.name"),
            "?",
        )
        for scope in resource.scope_spans:
            for span in scope.spans:
                spans.append(
                    SpanRecord(
                        service,
                        span.name,
                        span.kind,
                        span.trace_id,
                        span.start_time_unix_nano,
                        span.end_time_unix_nano,
                    )
                )
    return spans


def request_hops(spans: Sequence[SpanRecord]) -> dict[str, float] | None:
    """The hops of one request's trace in ms, or None when a span is missing."""

    def pick(service: str, prefix: str, suffix: str = "", last: bool = False) -> SpanRecord | None:
        found = sorted(
            (
                s
                for s in spans
                if s.service == service and s.name.startswith(prefix) and s.name.endswith(suffix)
            ),
            key=lambda s: s.start_ns,
        )
        if not found:
            return None
        return found[-1] if last else found[0]

    root = next((s for s in spans if s.service == "gateway" and s.kind == SERVER_KIND), None)
    published = pick("gateway", "llm.requests.", " publish")
    handled = pick("router", "llm.requests.", " process")
    call = pick("router", "inference call")
    reply = pick("router", "llm.replies", " publish", last=True)
    received = pick("gateway", "llm.replies", " process", last=True)
    if (
        root is None
        or published is None
        or handled is None
        or call is None
        or reply is None
        or received is None
    ):
        return None
    ms = 1e-6
    hops = {
        "admission": (published.start_ns - root.start_ns) * ms,
        "request_hop": (handled.start_ns - published.start_ns) * ms,
        "to_replica": (call.start_ns - handled.start_ns) * ms,
        "replica": (call.end_ns - call.start_ns) * ms,
        "reply_publish": (reply.start_ns - call.end_ns) * ms,
        "reply_hop": (received.start_ns - reply.start_ns) * ms,
        "answer": (root.end_ns - received.start_ns) * ms,
        "total": (root.end_ns - root.start_ns) * ms,
    }
    if root.end_ns < received.start_ns:
        # a stream: the gateway's span ends when the response starts, before the reply
        del hops["answer"], hops["total"]
    return hops


@dataclass(frozen=True)
class HopRow:
    hop: str
    p50_ms: float
    p99_ms: float


def breakdown(spans: Iterable[SpanRecord]) -> tuple[list[HopRow], int]:
    """p50/p99 of each hop over every complete trace, and how many traces that was."""
    traces: dict[bytes, list[SpanRecord]] = defaultdict(list)
    for span in spans:
        traces[span.trace_id].append(span)
    per_hop: dict[str, list[float]] = defaultdict(list)
    complete = 0
    for trace_spans in traces.values():
        hops = request_hops(trace_spans)
        if hops is None:
            continue
        complete += 1
        for key, value in hops.items():
            per_hop[key].append(value)
    rows = [HopRow(label, *_p50_p99(per_hop[key])) for label, key in HOPS if per_hop.get(key)]
    return rows, complete


def _p50_p99(values: list[float]) -> tuple[float, float]:
    if len(values) == 1:
        return values[0], values[0]
    return statistics.median(values), statistics.quantiles(values, n=100, method="inclusive")[98]


class SpanCollector:
    """Reads ``telemetry.spans`` from its end while a benchmark runs."""

    def __init__(self, bootstrap: str) -> None:
        self._bootstrap = bootstrap
        self.spans: list[SpanRecord] = []
        self._consumer: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer

        from shared.topics import TELEMETRY_SPANS

        self._consumer = AIOKafkaConsumer(
            TELEMETRY_SPANS.name,
            bootstrap_servers=self._bootstrap,
            auto_offset_reset="latest",
            enable_auto_commit=False,
            fetch_max_wait_ms=100,
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            batch = await self._consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for record in records:
                    self.spans.extend(decode(record.value))

    async def stop(self, settle_s: float = 2.0) -> None:
        """Stop after ``settle_s``, the services' span export delay and then some."""
        await asyncio.sleep(settle_s)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()

    def within(self, windows: Iterable[tuple[int, int]]) -> list[SpanRecord]:
        """Spans of the traces whose gateway span started inside one of ``windows`` (ns)."""
        ranges = list(windows)
        traces = {
            s.trace_id
            for s in self.spans
            if s.service == "gateway"
            and s.kind == SERVER_KIND
            and any(start <= s.start_ns <= end for start, end in ranges)
        }
        return [s for s in self.spans if s.trace_id in traces]
