"""Settings, envelope, health endpoints and logging of the common library."""

from __future__ import annotations

import json
import logging
import uuid

import httpx
import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider

from shared import envelope
from shared.events.v1 import events_pb2 as ev
from shared.health import HealthServer, HealthState
from shared.logging import configure_logging
from shared.settings import LogFormat, MeshSettings, Mode, SettingsError, load_settings


def test_settings_come_from_prefixed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHLLM_MODE", "cluster")
    monkeypatch.setenv("MESHLLM_KAFKA__BOOTSTRAP", "kafka-0:9092,kafka-1:9092")
    settings = load_settings(MeshSettings)
    assert settings.mode is Mode.CLUSTER
    assert settings.kafka.bootstrap == "kafka-0:9092,kafka-1:9092"
    assert settings.fetch_max_wait_ms == 500
    assert settings.session_timeout_ms == 10_000


def test_embedded_mode_defaults_suit_the_embedded_broker() -> None:
    settings = MeshSettings()
    assert settings.mode is Mode.EMBEDDED
    assert settings.fetch_max_wait_ms == 5
    assert settings.session_timeout_ms == 3_000


@pytest.mark.parametrize(
    ("name", "value", "complaint"),
    [
        ("MESHLLM_MODE", "galaxy", "Input should be 'embedded' or 'cluster'"),
        ("MESHLLM_KAFKA__BOOTSTRAP", "kafka", "is not host:port"),
        ("MESHLLM_BUS__MAX_ATTEMPTS", "0", "greater than or equal to 1"),
        ("MESHLLM_LOG_LEVEL", "loud", "should match pattern"),
        ("MESHLLM_HEALTH_PORT", "70000", "less than or equal to 65535"),
    ],
)
def test_bad_settings_fail_fast_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, complaint: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as error:
        load_settings(MeshSettings)
    assert name in str(error.value)
    assert complaint in str(error.value)


def test_envelope_is_stamped_once_and_checked() -> None:
    event = ev.AuditEvent(request_id="r")
    env = envelope.stamp(event, producer="gateway", tenant="acme")
    assert uuid.UUID(env.event_id).version == 7
    assert (env.producer, env.tenant, env.schema_version) == ("gateway", "acme", 1)
    first_id = env.event_id
    envelope.stamp(event, producer="other", tenant="other")
    assert (event.envelope.event_id, event.envelope.producer) == (first_id, "gateway")
    assert envelope.check(event) is event.envelope

    event.envelope.schema_version = 9
    with pytest.raises(envelope.EnvelopeError, match=r"unsupported envelope\.schema_version 9"):
        envelope.check(event)


def test_event_ids_sort_by_creation_time() -> None:
    ids = [envelope.new_event_id() for _ in range(50)]
    assert len(set(ids)) == 50
    times = [uuid.UUID(i).int >> 80 for i in ids]
    assert times == sorted(times)


async def test_health_endpoints_report_each_check() -> None:
    state = HealthState(service="demo")
    ready = {"value": False}
    state.liveness["loop"] = lambda: None
    state.readiness["model"] = lambda: None if ready["value"] else "model loading"
    server = HealthServer(state, "127.0.0.1", 0)
    await server.start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        async with httpx.AsyncClient() as client:
            live = await client.get(f"{base}/healthz")
            assert live.status_code == 200
            assert live.json() == {"service": "demo", "status": "ok", "checks": {"loop": "ok"}}
            not_ready = await client.get(f"{base}/readyz")
            assert not_ready.status_code == 503
            assert not_ready.json()["checks"] == {"model": "model loading"}
            ready["value"] = True
            assert (await client.get(f"{base}/readyz")).status_code == 200
            assert (await client.get(f"{base}/nope")).status_code == 404
            assert (await client.post(f"{base}/readyz")).status_code == 405
    finally:
        await server.stop()


def test_log_lines_are_json_with_trace_ids(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("demo", "INFO", LogFormat.JSON)
    tracer = TracerProvider().get_tracer("t")
    with tracer.start_as_current_span("work") as span:
        structlog.get_logger("x").info("hello", answer=42)
        logging.getLogger("aiokafka.demo").warning("from the stdlib")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    trace_id = format(span.get_span_context().trace_id, "032x")
    assert lines[0]["event"] == "hello"
    assert lines[0]["answer"] == 42
    assert lines[0]["service"] == "demo"
    assert lines[0]["trace_id"] == trace_id
    assert lines[1]["event"] == "from the stdlib"
    assert lines[1]["trace_id"] == trace_id


def test_log_lines_carry_no_pii_and_no_credentials(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("demo", "INFO", LogFormat.JSON)  # default PII policy for logs: mask
    key = "mk-0123456789ab-" + "S" * 32
    structlog.get_logger("x").info(
        "request failed",
        prompt="我的手机号是13812345678，邮箱 zhang.wei@example.com",
        header=f"Bearer {key}",
        nested={"card": "6222020200112233446"},
    )
    logging.getLogger("demo.stdlib").warning("bad key %s from 36.110.12.34", key)
    out = capsys.readouterr().err
    for secret in ("13812345678", "zhang.wei@example.com", "6222020200112233446", "S" * 32):
        assert secret not in out
    assert "36.110.12.34" not in out
    lines = [json.loads(line) for line in out.splitlines()]
    assert "[PHONE:" in lines[0]["prompt"]
    assert lines[0]["header"] == "Bearer [REDACTED]"
    assert "mk-0123456789ab-[REDACTED]" in lines[1]["event"]  # the key id stays, for tracing
