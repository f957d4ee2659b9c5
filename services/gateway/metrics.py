"""The gateway's metrics: every request by route, status, tenant and model; refusals by
reason; and GenAI's server metrics for the answers (duration, time to first token, time
per output token, tokens used).

Each answer is also a span, ``{operation} {model}`` (GenAI's span convention), from the
request to the answer's end, with its tokens, time to first token, tenant and error: the
ops service computes its SLIs from these spans on ``telemetry.spans``. (The request's
HTTP span ends when the response starts, before a stream has said anything.)

Names and attributes follow OpenTelemetry's semantic conventions for HTTP servers and
for generative AI (``gen_ai.operation.name`` is ``chat``, ``text_completion`` or
``embeddings``). A model name comes from the caller's body: it is a label only when the
gateway serves that model (else ``other``), so a caller cannot mint series.
"""

from __future__ import annotations

import time
from collections.abc import Collection

from opentelemetry import trace

from shared.instruments import get_meter
from shared.metrics import PER_TOKEN_BUCKETS, TOKEN_BUCKETS, bounded, histogram

OPERATIONS = {"chat": "chat", "completion": "text_completion", "embedding": "embeddings"}

_meter = get_meter("meshllm.gateway")
_tracer = trace.get_tracer("meshllm.gateway")
_http_duration = histogram(
    _meter,
    "http.server.request.duration",
    unit="s",
    description="Until the response starts (a stream's whole time is in "
    "gen_ai.server.request.duration)",
)
_requests = _meter.create_counter(
    "meshllm.gateway.requests",
    unit="{request}",
    description="Requests by route, status, tenant and model",
)
_refusals = _meter.create_counter(
    "meshllm.gateway.refusals",
    unit="{request}",
    description="Requests refused before the mesh saw them, by reason (policy_denied, "
    "rate_limit_exceeded, invalid_api_key, ...)",
)
_duration = histogram(
    _meter,
    "gen_ai.server.request.duration",
    unit="s",
    description="From the request to the end of its answer, streams included",
)
_ttft = histogram(
    _meter,
    "gen_ai.server.time_to_first_token",
    unit="s",
    description="From the request to the first text of a streamed answer",
)
_per_token = histogram(
    _meter,
    "gen_ai.server.time_per_output_token",
    unit="s",
    description="After the first text, seconds per further output token",
    buckets=PER_TOKEN_BUCKETS,
)
_tokens = histogram(
    _meter,
    "gen_ai.client.token.usage",
    unit="{token}",
    description="Tokens per request, by gen_ai.token.type (input, output)",
    buckets=TOKEN_BUCKETS,
)


class GatewayMetrics:
    """Records one gateway's requests; ``models`` are the model names it serves."""

    def __init__(self, models: Collection[str], tracer: trace.Tracer | None = None) -> None:
        """``tracer``: where the answers' spans go (default: the process's provider)."""
        self._models = frozenset(models)
        self._tracer = tracer or _tracer

    def model(self, name: str | None) -> str:
        return bounded(name or "", self._models)

    def request(
        self,
        *,
        method: str,
        route: str,
        status: int,
        seconds: float,
        tenant: str,
        model: str | None,
        error: str | None,
    ) -> None:
        """One HTTP request, when its response starts. ``route`` is the route's template."""
        http: dict[str, str | int] = {
            "http.request.method": method,
            "http.route": route,
            "http.response.status_code": status,
        }
        if error is not None:
            http["error.type"] = error
        _http_duration.record(seconds, http)
        _requests.add(
            1,
            {
                "http.route": route,
                "http.response.status_code": status,
                "tenant": tenant or "anonymous",
                "gen_ai.request.model": self.model(model),
            },
        )
        if error is not None and 400 <= status < 500:
            _refusals.add(1, {"reason": error, "tenant": tenant or "anonymous"})

    def answer(
        self,
        *,
        parent: trace.SpanContext | None,
        tenant: str,
        kind: str,
        model: str,
        seconds: float,
        first_token_s: float | None,
        output_tokens: int,
        input_tokens: int,
        error: str | None,
        status: int = 200,
        model_version: str = "",
        pool: str = "",
    ) -> None:
        """One answer, at its end (a whole body sent, or a stream's last event). The model
        version and pool (as the reply names them) go on the span only: the ops service's
        SLIs are per version and pool, the histograms here are not (their series would
        multiply with every version)."""
        common = {
            "gen_ai.operation.name": OPERATIONS.get(kind, kind),
            "gen_ai.request.model": self.model(model),
        }
        placed = {"meshllm.model.version": model_version, "meshllm.pool": pool}
        self._span(parent, common, tenant=tenant, seconds=seconds, first_token_s=first_token_s,
                   tokens=(input_tokens, output_tokens), error=error, status=status,
                   placed={k: v for k, v in placed.items() if v})  # fmt: skip
        timed: dict[str, str | int] = {**common, "http.response.status_code": status}
        if error:
            timed["error.type"] = error
        _duration.record(seconds, timed)
        if first_token_s is not None:
            _ttft.record(first_token_s, common)
            if output_tokens > 1 and error is None:
                _per_token.record((seconds - first_token_s) / (output_tokens - 1), common)
        if error is None:
            _tokens.record(input_tokens, {**common, "gen_ai.token.type": "input"})
            if kind != "embedding":
                _tokens.record(output_tokens, {**common, "gen_ai.token.type": "output"})

    def _span(
        self,
        parent: trace.SpanContext | None,
        common: dict[str, str],
        *,
        tenant: str,
        seconds: float,
        first_token_s: float | None,
        tokens: tuple[int, int],
        error: str | None,
        status: int,
        placed: dict[str, str] | None = None,
    ) -> None:
        end = time.time_ns()
        attributes: dict[str, str | int | float] = {
            **common,
            **(placed or {}),
            "gen_ai.usage.input_tokens": tokens[0],
            "gen_ai.usage.output_tokens": tokens[1],
            "meshllm.tenant": tenant or "anonymous",
            "http.response.status_code": status,
        }
        if first_token_s is not None:
            attributes["meshllm.time_to_first_token_s"] = first_token_s
        if error is not None:
            attributes["error.type"] = error
        context = trace.set_span_in_context(trace.NonRecordingSpan(parent)) if parent else None
        span = self._tracer.start_span(
            f"{common['gen_ai.operation.name']} {common['gen_ai.request.model']}",
            context=context,
            kind=trace.SpanKind.INTERNAL,
            attributes=attributes,
            start_time=end - int(seconds * 1e9),
        )
        if error is not None:
            span.set_status(trace.StatusCode.ERROR, error)
        span.end(end_time=end)
