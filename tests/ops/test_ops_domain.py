"""The ops service's domain: answers from spans, SLI windows, alert rules. No broker."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.gateway.metrics import GatewayMetrics
from services.ops.alerts import DEFAULT_RULES, Evaluator, Rule, RulesError, load_rules
from services.ops.sli import MAX_CELLS, SliWindows
from services.ops.spans import Answer, NotSpans, answers

MODEL = "smollm2-135m-instruct"


def gateway_spans(service: str = "gateway") -> tuple[GatewayMetrics, InMemorySpanExporter]:
    """The gateway's own answer spans, kept in memory (as the gateway makes them)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return GatewayMetrics([MODEL], tracer=provider.get_tracer("test")), exporter


def answered(metrics: GatewayMetrics, **overrides: object) -> None:
    fields: dict[str, object] = {
        "parent": None, "tenant": "acme", "kind": "chat", "model": MODEL, "seconds": 0.3,
        "first_token_s": 0.1, "output_tokens": 9, "input_tokens": 20, "error": None,
    }  # fmt: skip
    fields.update(overrides)
    metrics.answer(**fields)  # type: ignore[arg-type]


def answer(at_s: float, seconds: float, **overrides: object) -> Answer:
    fields: dict[str, object] = {
        "at_s": at_s, "operation": "chat", "model": MODEL, "tenant": "acme",
        "seconds": seconds, "first_token_s": seconds / 3, "input_tokens": 10,
        "output_tokens": 5, "error": None, "status": 200,
    }  # fmt: skip
    fields.update(overrides)
    return Answer(**fields)  # type: ignore[arg-type]


# ------------------------------------------------------------------ spans -> answers


def test_the_gateways_answer_spans_are_read_back_as_answers() -> None:
    metrics, exporter = gateway_spans()
    answered(metrics)
    answered(metrics, model="made-up", error="inference_unavailable", status=503,
             first_token_s=None, output_tokens=0)  # fmt: skip
    found = list(answers(encode_spans(exporter.get_finished_spans()).SerializeToString()))
    assert [(a.model, a.tenant, a.output_tokens, a.status) for a in found] == [
        (MODEL, "acme", 9, 200),
        ("other", "acme", 0, 503),  # a model the gateway does not serve is "other"
    ]
    good, failed = found
    assert good.seconds == pytest.approx(0.3, abs=1e-6)
    assert good.first_token_s == pytest.approx(0.1)
    assert not good.failed
    assert failed.failed
    assert failed.error == "inference_unavailable"


def test_the_model_version_and_pool_of_an_answer_group_the_slis() -> None:
    metrics, exporter = gateway_spans()
    answered(metrics, model_version="1", pool="cpu", seconds=0.2)
    answered(metrics, model_version="2", pool="gpu", seconds=0.8)
    answered(metrics, model_version="2", pool="gpu", seconds=0.6)
    answered(metrics)  # a reply that named neither
    found = list(answers(encode_spans(exporter.get_finished_spans()).SerializeToString()))
    assert [(a.model_version, a.pool) for a in found] == [
        ("1", "cpu"), ("2", "gpu"), ("2", "gpu"), ("unknown", "unknown"),
    ]  # fmt: skip
    windows = SliWindows(bucket_s=10, keep_s=900, clock=lambda: found[0].at_s)
    windows.add_all(found)
    by_version = windows.slis(found[0].at_s, 60, by=["model_version", "pool"])
    assert by_version[(("model_version", "2"), ("pool", "gpu"))].requests == 2
    assert by_version[(("model_version", "1"), ("pool", "cpu"))].requests == 1
    only_two = windows.slis(found[0].at_s, 60, where={"model_version": ["2"]})[()]
    assert only_two.requests == 2
    assert only_two.p50_s == pytest.approx(0.6, rel=0.02)  # of 0.6 and 0.8, not of 0.2


def test_a_client_that_went_away_is_not_an_error_of_the_mesh() -> None:
    assert not answer(0, 1, error="client_closed_request", status=499).failed
    assert not answer(0, 1, error="model_not_found", status=404).failed
    assert answer(0, 1, error="deadline_exceeded", status=504).failed


def test_other_spans_and_other_services_are_skipped() -> None:
    metrics, exporter = gateway_spans(service="router")  # not the gateway
    answered(metrics)
    provider = TracerProvider(resource=Resource.create({"service.name": "gateway"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("test").start_as_current_span("POST /v1/chat/completions"):
        pass
    assert list(answers(encode_spans(exporter.get_finished_spans()).SerializeToString())) == []


@pytest.mark.parametrize("payload", [b"\xff\xfe not protobuf", b"\x0a\x05\x0a\x03\xff"])
def test_a_record_that_is_not_otlp_is_refused(payload: bytes) -> None:
    with pytest.raises(NotSpans):
        list(answers(payload))


def test_hostile_attribute_values_are_bounded_or_ignored() -> None:
    metrics, exporter = gateway_spans()
    answered(metrics, tenant="t" * 5000)
    request = encode_spans(exporter.get_finished_spans())
    span = request.resource_spans[0].scope_spans[0].spans[0]
    for pair in span.attributes:  # tokens as text, a negative first-token time
        if pair.key == "gen_ai.usage.output_tokens":
            pair.value.Clear()
            pair.value.string_value = "9999999"
        if pair.key == "meshllm.time_to_first_token_s":
            pair.value.double_value = -5.0
    [found] = answers(request.SerializeToString())
    assert len(found.tenant) == 128
    assert found.output_tokens == 0
    assert found.first_token_s is None


@pytest.mark.parametrize(
    ("edit", "kept"),
    [
        (lambda span, attrs: attrs["meshllm.time_to_first_token_s"].__setattr__(
            "double_value", float("inf")), True),  # kept, without a first-token time
        (lambda span, attrs: attrs["meshllm.time_to_first_token_s"].__setattr__(
            "double_value", 99.0), True),  # after the answer's end: no first-token time
        (lambda span, attrs: span.__setattr__(
            "start_time_unix_nano", span.end_time_unix_nano + 1), False),  # negative
        (lambda span, attrs: span.__setattr__("start_time_unix_nano", 1), False),  # decades
        (lambda span, attrs: attrs["gen_ai.operation.name"].__setattr__(
            "string_value", "x" * 50), False),  # not one of GenAI's operations
    ],
)  # fmt: skip
def test_impossible_values_never_reach_the_windows(edit: Any, kept: bool) -> None:
    metrics, exporter = gateway_spans()
    answered(metrics)
    request = encode_spans(exporter.get_finished_spans())
    span = request.resource_spans[0].scope_spans[0].spans[0]
    edit(span, {pair.key: pair.value for pair in span.attributes})
    found = list(answers(request.SerializeToString()))
    assert len(found) == int(kept)
    if kept:
        assert found[0].first_token_s is None


# ------------------------------------------------------------------ SLI windows


def test_window_percentiles_are_within_the_sketchs_accuracy() -> None:
    rng = random.Random(3)
    windows = SliWindows(bucket_s=10, keep_s=900, clock=lambda: 1250)
    latencies = [rng.lognormvariate(-1.5, 0.8) for _ in range(5000)]
    for i, seconds in enumerate(latencies):
        windows.add(answer(1000 + i * 0.05, seconds))  # 250 s of answers
    [sli] = windows.slis(now_s=1250, window_s=300).values()
    assert sli.requests == 5000
    assert sli.streamed == 5000
    for quantile, found in ((0.5, sli.p50_s), (0.99, sli.p99_s)):
        exact = float(np.quantile(latencies, quantile, method="lower"))
        assert found == pytest.approx(exact, rel=0.02), quantile
    # the buckets that start after now - 300 s (from 960 s) cover 290 s up to now
    assert sli.window_s == 290
    assert sli.rate_per_s == pytest.approx(5000 / 290)


def test_windows_group_by_any_labels_and_forget_old_buckets() -> None:
    now = [110.0]
    windows = SliWindows(bucket_s=10, keep_s=120, clock=lambda: now[0])
    windows.add(answer(100, 0.2, tenant="acme"))
    windows.add(answer(105, 0.4, tenant="globex", status=503, error="x"))
    windows.add(answer(105, 0.4, tenant="globex", model="other"))
    by_tenant = windows.slis(now_s=110, window_s=60, by=["tenant"])
    assert by_tenant[(("tenant", "acme"),)].requests == 1
    assert by_tenant[(("tenant", "globex"),)].error_rate == 0.5
    everything = windows.slis(now_s=110, window_s=60)
    assert everything[()].requests == 3
    assert windows.slis(now_s=300, window_s=60) == {}  # out of the window
    now[0] = 400  # the clock moves on: the first buckets are dropped
    windows.add(answer(400, 0.1))
    windows.add(answer(100, 0.1))  # older than the windows reach
    assert windows.too_old == 1
    assert windows.slis(now_s=400, window_s=900)[()].requests == 1
    with pytest.raises(ValueError, match="unknown label"):
        windows.slis(now_s=0, window_s=60, by=["region"])


def test_a_steady_rate_reads_right_between_bucket_boundaries() -> None:
    windows = SliWindows(bucket_s=10, keep_s=900, clock=lambda: 1005)
    for i in range(1000):  # 10 answers a second, until now
        windows.add(answer(905 + i * 0.1, 0.1))
    [sli] = windows.slis(now_s=1005, window_s=60).values()
    assert sli.rate_per_s == pytest.approx(10, rel=0.02)


def test_a_span_from_the_future_or_a_flood_of_tenants_stays_bounded() -> None:
    windows = SliWindows(bucket_s=10, keep_s=900, clock=lambda: 1000)
    windows.add(answer(10**12, 0.1))  # a clock far ahead (or a forged span): refused
    assert windows.from_future == 1
    windows.add(answer(999, 0.1))
    assert windows.slis(now_s=1000, window_s=60)[()].requests == 1  # nothing was wiped
    for i in range(MAX_CELLS + 500):
        windows.add(answer(995, 0.1, tenant=f"t{i}"))
    assert windows.folded == 501  # one cell was taken by the first answer
    by_tenant = windows.slis(now_s=1000, window_s=60, by=["tenant"])
    assert len(by_tenant) == MAX_CELLS + 1
    assert by_tenant[(("tenant", "other"),)].requests == 501


# ------------------------------------------------------------------ alert rules


def rule(**overrides: object) -> Rule:
    fields: dict[str, object] = {
        "name": "LatencyP99High", "indicator": "p99_s", "threshold": 0.5, "clear": 0.4,
        "for_s": 60, "clear_for_s": 120, "window_s": 300, "by": ("model",),
        "min_requests": 5, "summary": "slow",
    }  # fmt: skip
    fields.update(overrides)
    return Rule.model_validate(fields)


def test_an_alert_fires_after_its_for_duration_and_resolves_with_hysteresis() -> None:
    evaluator = Evaluator([rule()])
    group = (("model", MODEL),)
    values = {"now": 0.6}

    def slis(r: Rule) -> dict:  # type: ignore[type-arg]
        windows = SliWindows(clock=lambda: 1010)
        for i in range(10):
            windows.add(answer(1000 + i, values["now"]))
        return windows.slis(1010, 300, r.by)

    assert evaluator.evaluate(0, slis) == []  # breached: pending
    assert evaluator.evaluate(59, slis) == []
    [fired] = evaluator.evaluate(60, slis)
    assert (fired.firing, fired.labels, fired.since_s) == (True, group, 0)
    assert fired.value == pytest.approx(0.6, rel=0.02)
    values["now"] = 0.45  # below the threshold, not below the clear bound: still firing
    assert evaluator.evaluate(100, slis) == []
    assert evaluator.evaluate(400, slis) == []
    values["now"] = 0.3
    assert evaluator.evaluate(500, slis) == []  # clearing
    values["now"] = 0.6  # back up before clear_for_s: the clearing starts over
    assert evaluator.evaluate(550, slis) == []
    values["now"] = 0.3
    assert evaluator.evaluate(600, slis) == []
    [resolved] = evaluator.evaluate(720, slis)
    assert not resolved.firing
    assert resolved.alert_id == fired.alert_id
    assert evaluator.firing() == []


def test_too_few_answers_never_fire_and_a_vanished_group_resolves() -> None:
    evaluator = Evaluator([rule(for_s=0, clear_for_s=0, min_requests=20)])
    windows = SliWindows(clock=lambda: 1020)
    for i in range(19):
        windows.add(answer(1000 + i, 5.0))
    assert evaluator.evaluate(1020, lambda r: windows.slis(1020, r.window_s, r.by)) == []
    windows.add(answer(1019, 5.0))
    [fired] = evaluator.evaluate(1020, lambda r: windows.slis(1020, r.window_s, r.by))
    assert fired.firing
    [resolved] = evaluator.evaluate(2000, lambda r: {})  # no answers at all any more
    assert not resolved.firing
    assert resolved.value is None


def test_the_bundled_rules_hold_the_slo_thresholds() -> None:
    rules = {r.name: r for r in load_rules(DEFAULT_RULES)}
    assert (rules["LatencyP99High"].indicator, rules["LatencyP99High"].threshold) == ("p99_s", 0.5)
    assert (rules["ErrorRateHigh"].indicator, rules["ErrorRateHigh"].threshold) == (
        "error_rate", 0.001,
    )  # fmt: skip
    assert all(r.clear_for_s > 0 for r in rules.values())
    # every rule on answers waits for_s; a dead letter is worth a ticket at once
    assert {name for name, r in rules.items() if r.for_s == 0} == {"DeadLettersGrowing"}


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("rules: [{name: A, indicator: p98_s, threshold: 1, clear: 1, for_s: 1, "
         "clear_for_s: 1, window_s: 1, summary: s}]", "rules.0.indicator"),
        ("rules: [{name: A, indicator: p99_s, threshold: 1, clear: 2, for_s: 1, "
         "clear_for_s: 1, window_s: 1, summary: s}]", r"clear \(2.0\) must be at or below"),
        ("rules: [{name: A, indicator: p99_s, threshold: 1, clear: 1, for_s: 1, "
         "clear_for_s: 1, window_s: 1, summary: s, by: [region]}]", "unknown label"),
        ("rules: [{name: A, indicator: p99_s, threshold: 1, clear: 1, for_s: 1, "
         "clear_for_s: 1, window_s: 1, summary: s, colour: red}]", "rules.0.colour"),
        ("rules: [{name: A, indicator: p99_s, threshold: 1, clear: 1, for_s: 1, "
         "clear_for_s: 1, window_s: 1, summary: s}, {name: A, indicator: p50_s, "
         "threshold: 1, clear: 1, for_s: 1, clear_for_s: 1, window_s: 1, summary: s}]",
         "used twice"),
        ("rules: [", "while parsing"),
    ],
)  # fmt: skip
def test_a_bad_rules_file_is_refused_naming_the_rule_and_field(
    tmp_path: Path, text: str, named: str
) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    with pytest.raises(RulesError, match=named):
        load_rules(path)


def test_the_ops_service_does_not_feed_its_own_spans_back_to_itself() -> None:
    from services.ops.settings import OpsSettings

    assert not OpsSettings().telemetry.spans_to_kafka
    assert OpsSettings().telemetry.prometheus


def test_first_token_rules_count_only_streamed_answers() -> None:
    ttft = rule(name="Ttft", indicator="ttft_p99_s", threshold=2, clear=1.5, for_s=0,
                min_requests=5)  # fmt: skip
    windows = SliWindows(clock=lambda: 1020)
    windows.add(answer(1000, 9.0, first_token_s=5.0))  # one slow stream
    for i in range(30):  # and many answers that were not streamed
        windows.add(answer(1001 + i * 0.1, 0.2, first_token_s=None))
    evaluator = Evaluator([ttft])
    assert evaluator.evaluate(1020, lambda r: windows.slis(1020, r.window_s, r.by)) == []


class FlakyPublisher:
    """A test double for the bus publisher: refuses the first publish, then takes all."""

    def __init__(self) -> None:
        self.refuse = 1
        self.published: list[object] = []

    async def publish(self, topic: object, event: object, **_: object) -> None:
        if self.refuse:
            self.refuse -= 1
            raise ConnectionError("broker away")
        self.published.append(event)


async def test_an_alert_the_broker_did_not_take_goes_out_at_the_next_evaluation() -> None:
    from services.ops.service import OpsService

    now = [1020.0]
    windows = SliWindows(clock=lambda: now[0])
    for i in range(10):
        windows.add(answer(1000 + i, 5.0))
    publisher = FlakyPublisher()
    ops = OpsService(windows, Evaluator([rule(for_s=0, clear_for_s=0)]), publisher,  # type: ignore[arg-type]
                     clock=lambda: now[0])  # fmt: skip
    with pytest.raises(ConnectionError):
        await ops.evaluate_now()
    assert len(ops.outbox) == 1
    await ops.evaluate_now()  # nothing new: the held alert goes out
    assert [a.rule for a in publisher.published] == ["LatencyP99High"]  # type: ignore[attr-defined]
    assert ops.outbox == []


async def test_spans_of_other_services_are_not_read() -> None:
    from services.ops.service import OpsService
    from shared.bus.consumer import EventContext
    from shared.events.v1 import events_pb2 as ev

    metrics, exporter = gateway_spans()
    answered(metrics)
    payload = encode_spans(exporter.get_finished_spans()).SerializeToString()
    windows = SliWindows()
    ops = OpsService(windows, Evaluator([]), FlakyPublisher())  # type: ignore[arg-type]
    for key, counted in ((b"router", 0), (b"gateway", 1)):
        ctx = EventContext("telemetry.spans", 0, 0, key, [], ev.Envelope(), attempt=1)
        await ops.on_spans(payload, ctx)
        found = windows.slis(time.time(), 60)
        assert sum(s.requests for s in found.values()) == counted, key
