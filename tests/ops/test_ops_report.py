"""``meshllm ops report``: the page's numbers, its escaping, and the command on a broker."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

from meshllm.ops_report import events, minutes, parse_since, render, span_answers
from shared.bus import Bus
from shared.bus.embedded import EmbeddedBroker
from shared.events.v1 import events_pb2 as ev
from shared.settings import MeshSettings
from shared.topics import OPS_ALERTS, OPS_SCALING, TELEMETRY_SPANS
from tests.conftest import ROOT
from tests.ops.test_ops_domain import answer, answered, gateway_spans


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("30m", 1800), ("1h", 3600),
                                               ("2d", 172_800), ("1.5h", 5400)])  # fmt: skip
def test_since_reads_a_number_and_a_unit(text: str, seconds: float) -> None:
    assert parse_since(text) == seconds


@pytest.mark.parametrize("text", ["", "1", "1w", "-1h", "8d", "0s", "1h; rm -rf /"])
def test_a_bad_since_is_refused_naming_the_option(text: str) -> None:
    with pytest.raises(ValueError, match="--since"):
        parse_since(text)


def test_minutes_hold_the_ops_services_indicators() -> None:
    now = 1_000_020.0  # a whole minute: the rows are UTC minutes
    found = [answer(now - 180 + i, 0.2) for i in range(60)]  # one minute, fast
    found += [answer(now - 120 + i / 2, 1.0) for i in range(60)]  # the next, slow
    found.append(answer(now - 30, 0.2, error="server_error", status=503))
    found.append(answer(now - 7200, 5.0))  # before the report's span: left out
    rows = minutes(found, now - 600, now)
    assert [(r.start_s, round(r.rate_per_s * 60)) for r in rows] == [
        (now - 180, 60), (now - 120, 60), (now - 60, 1),
    ]  # fmt: skip
    assert rows[0].p99_s == pytest.approx(0.2, rel=0.02)
    assert rows[1].p99_s == pytest.approx(1.0, rel=0.02)
    assert (rows[0].error_rate, rows[2].error_rate) == (0.0, 1.0)


def test_the_page_embeds_its_plot_and_escapes_what_the_topics_say() -> None:
    now = 1_000_000.0
    alert = ev.OpsAlert(alert_id="a", rule="LatencyP99High", state=ev.ALERT_STATE_FIRING,
                        labels={"model": "<script>alert(1)</script>"}, value=0.9,
                        threshold=0.5)  # fmt: skip
    alert.envelope.occurred_at.FromSeconds(int(now - 60))
    decision = ev.ScalingDecision(deployment="ChatDeployment", current_replicas=1,
                                  target_replicas=2, reason="p99: <b>slow</b>")  # fmt: skip
    decision.envelope.occurred_at.FromSeconds(int(now - 50))
    found = events([alert], [decision])
    rows = minutes([answer(now - 100 + i, 0.3) for i in range(50)], now - 600, now)
    page = render(rows, found, now - 600, now, 50)
    assert re.search(
        r'<img alt="answers per minute" src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"', page
    )
    assert "<script>" not in page
    assert "&lt;script&gt;" in page
    assert "&lt;b&gt;slow&lt;/b&gt;" in page
    assert "ChatDeployment 1 -&gt; 2" in page
    assert "50 answers" in page
    empty = render([], [], now - 600, now, 0)
    assert "No answers and no events" in empty


def test_only_the_gateways_records_are_read_and_garbage_is_skipped() -> None:
    metrics, exporter = gateway_spans()
    answered(metrics)
    payload = encode_spans(exporter.get_finished_spans()).SerializeToString()
    found = span_answers([(b"gateway", payload), (b"router", payload), (b"gateway", b"\xff\x00")])
    assert len(found) == 1


@pytest.mark.kafka
async def test_the_command_writes_the_page_from_the_topics(tmp_path: Path) -> None:
    broker = EmbeddedBroker(log_file=tmp_path / "broker.log")
    await broker.start()
    try:
        bus = Bus(MeshSettings(kafka={"bootstrap": broker.bootstrap}, data_dir=tmp_path / "bus"),
                  service="ops")  # fmt: skip
        await bus.start()
        metrics, exporter = gateway_spans()
        for _ in range(5):
            answered(metrics, seconds=0.8)
        payload = encode_spans(exporter.get_finished_spans()).SerializeToString()
        await bus.publisher.publish_raw(TELEMETRY_SPANS.name, payload, key=b"gateway", headers=[])
        alert = ev.OpsAlert(alert_id="x", rule="LatencyP99High", state=ev.ALERT_STATE_FIRING,
                            labels={"model": "m"}, value=0.8, threshold=0.5)  # fmt: skip
        await bus.publisher.publish(OPS_ALERTS, alert, key="x")
        decision = ev.ScalingDecision(deployment="ChatDeployment", current_replicas=1,
                                      target_replicas=2, reason="queue: test")  # fmt: skip
        await bus.publisher.publish(OPS_SCALING, decision, key="ChatDeployment")
        await bus.stop()
        out = tmp_path / "report.html"
        env = {**os.environ, "MESHLLM_KAFKA__BOOTSTRAP": broker.bootstrap,
               "MESHLLM_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(ROOT)}  # fmt: skip
        started = time.monotonic()
        done = subprocess.run(  # noqa: ASYNC221 - the command under test, run as a user would
            [sys.executable, "-m", "meshllm", "ops", "report", "--since", "10m", "--out", str(out)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert "5 answers, 1 alert events, 1 scaling decisions" in done.stderr
        page = out.read_text()
        assert "LatencyP99High (model=m)" in page
        assert "ChatDeployment 1 -&gt; 2: queue: test" in page
        assert "data:image/png;base64," in page
        assert time.monotonic() - started < 120
        bad = subprocess.run(  # noqa: ASYNC221
            [sys.executable, "-m", "meshllm", "ops", "report", "--since", "forever"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert bad.returncode == 2
        assert "--since" in bad.stderr
    finally:
        await broker.stop()
