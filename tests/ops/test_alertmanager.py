"""The ops loop's alerts in a real Alertmanager (Debian's ``prometheus-alertmanager``,
installed by the test set-up when missing and this is root), and the payload's shape."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.ops.alerts import Evaluator, Rule
from services.ops.notify import AlertmanagerNotifier, payload
from services.ops.service import OpsService
from services.ops.sli import SliWindows
from services.ops.spans import Answer
from shared.bus.embedded import free_port
from tests.ops.tools import debian_tool

MODEL = "smollm2-135m-instruct"
RULE = Rule(name="LatencyP99High", indicator="p99_s", threshold=0.5, clear=0.4, for_s=0,
            clear_for_s=0, window_s=60, by=("model",), min_requests=5,
            summary="P99 latency above 500 ms")  # fmt: skip
CONFIG = """
route:
  receiver: nowhere
receivers:
  - name: nowhere
"""


def alertmanager_binary() -> str:
    """Alertmanager, from Debian's package; installed when missing and this is root."""
    names = ("prometheus-alertmanager", "alertmanager")
    return debian_tool(names, "prometheus-alertmanager", "to receive the ops loop's alerts")


@pytest.fixture
async def alertmanager(tmp_path: Path) -> AsyncIterator[str]:
    config = tmp_path / "alertmanager.yml"
    config.write_text(CONFIG)
    port = free_port()
    process = subprocess.Popen(  # noqa: ASYNC220 - returns at once
        [alertmanager_binary(), f"--config.file={config}", f"--storage.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    async def ready() -> bool:
        try:
            async with httpx.AsyncClient() as client:
                return (await client.get(f"{url}/-/ready")).status_code == 200
        except httpx.TransportError:
            return False

    try:
        for _ in range(300):
            if await ready():
                break
            assert process.poll() is None, "alertmanager exited"
            await asyncio.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(30)


def slow(at_s: float) -> Answer:
    return Answer(at_s=at_s, operation="chat", model=MODEL, tenant="acme", seconds=2.0,
                  first_token_s=None, input_tokens=3, output_tokens=4, error=None)  # fmt: skip


class Publisher:
    """A test double for the bus publisher (the Kafka path is tested in test_ops_service)."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    async def publish(self, topic: Any, event: Any, *, key: Any = None) -> None:
        self.sent.append(event)


async def active(url: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as client:
        reply = await client.get(f"{url}/api/v2/alerts", params={"active": "true"})
    reply.raise_for_status()
    found: list[dict[str, Any]] = reply.json()
    return found


async def test_alerts_fire_and_resolve_in_a_real_alertmanager(alertmanager: str) -> None:
    # the real clock: Alertmanager judges startsAt and endsAt by its own
    windows = SliWindows(bucket_s=1, keep_s=60)
    short = RULE.model_copy(update={"window_s": 2.0})
    notifier = AlertmanagerNotifier(alertmanager, every_s=5)
    ops = OpsService(windows, Evaluator([short]), Publisher(), notifier=notifier)  # type: ignore[arg-type]
    try:
        windows.add_all(slow(time.time() - i / 10) for i in range(10))
        [fired], _ = await ops.evaluate_now()
        assert fired.firing
        found = await poll_until_alerts(alertmanager, 1)
        labels = found[0]["labels"]
        assert labels["alertname"] == "LatencyP99High"
        assert labels["model"] == MODEL
        assert (labels["severity"], labels["service"]) == ("page", "meshllm-ops")
        assert found[0]["annotations"]["threshold"] == "0.5"
        assert found[0]["status"]["state"] == "active"
        await asyncio.sleep(3.5)  # the slow answers leave the window: no value, so it resolves
        [resolved], _ = await ops.evaluate_now()
        assert not resolved.firing
        assert notifier.pending == []  # taken
        await poll_until_alerts(alertmanager, 0)
    finally:
        await notifier.close()


async def poll_until_alerts(url: str, count: int) -> list[dict[str, Any]]:
    seen: list[list[dict[str, Any]]] = []

    async def check() -> bool:
        seen.append(await active(url))
        return len(seen[-1]) == count

    for _ in range(100):
        if await check():
            return seen[-1]
        await asyncio.sleep(0.1)
    return pytest.fail(f"Alertmanager shows {seen[-1]}, not {count} alert(s)")


async def test_an_unreachable_alertmanager_keeps_the_resolutions_for_the_next_round() -> None:
    notifier = AlertmanagerNotifier(f"http://127.0.0.1:{free_port()}", every_s=5)
    evaluator = Evaluator([RULE])
    windows = SliWindows(bucket_s=10, keep_s=300, clock=lambda: 1000.0)
    windows.add_all(slow(990.0 + i) for i in range(10))
    [fired] = evaluator.evaluate(1000.0, lambda r: windows.slis(1000.0, r.window_s, r.by))
    [resolved] = evaluator.evaluate(2000.0, lambda r: {})
    try:
        assert await notifier.notify(2000.0, evaluator.firing(), [resolved]) is False
        assert notifier.pending == [resolved]
        assert fired.alert_id == resolved.alert_id
    finally:
        await notifier.close()


def test_the_payload_sends_firing_alerts_ahead_and_resolved_ones_ended() -> None:
    evaluator = Evaluator([RULE])
    windows = SliWindows(bucket_s=10, keep_s=300, clock=lambda: 1000.0)
    windows.add_all(slow(990.0 + i) for i in range(10))
    evaluator.evaluate(1000.0, lambda r: windows.slis(1000.0, r.window_s, r.by))
    [firing] = payload(1000.0, evaluator.firing(), [], every_s=5)
    assert firing["startsAt"] == "1970-01-01T00:16:40Z"
    assert firing["endsAt"] == "1970-01-01T00:16:55Z"  # 3 rounds ahead: lapses if ops dies
    assert firing["annotations"]["value"] != "unknown"
    [resolved] = evaluator.evaluate(2000.0, lambda r: {})
    [ended] = payload(2000.0, [], [resolved], every_s=5)
    assert ended["endsAt"] == "1970-01-01T00:33:20Z"
    assert ended["annotations"]["value"] == "unknown"  # it resolved for want of answers
    assert ended["labels"] == firing["labels"]


def test_compose_sends_both_alert_sources_to_an_alertmanager_that_amtool_accepts() -> None:
    import yaml

    from tests.conftest import ROOT

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    config = "./deploy/alertmanager/alertmanager.yml:/etc/alertmanager/alertmanager.yml:ro"
    assert config in services["alertmanager"]["volumes"]
    ops = services["ops"]["environment"]
    assert ops["MESHLLM_OPS__ALERTMANAGER_URL"] == "http://alertmanager:9093"
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    [target] = prometheus["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert target == "alertmanager:9093"
    amtool = Path(alertmanager_binary()).with_name("amtool")
    if not amtool.exists():
        amtool = Path(shutil.which("amtool") or "amtool")
    checked = subprocess.run(
        [str(amtool), "check-config", str(ROOT / "deploy/alertmanager/alertmanager.yml")],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
