"""``meshllm up``: starting, watching and stopping the broker and services."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from meshllm.access import FIRST_QUESTION
from meshllm.services import ServiceSpec
from meshllm.supervisor import Supervisor, state_path
from shared.bus.admin import ensure_topics
from shared.bus.embedded import free_port
from shared.settings import MeshSettings
from tests.conftest import ROOT, poll_until
from tests.procs.topics import scratch_topic

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]

# a question every weight mode answers with a clear margin (the bare one is a near tie)
QUESTION = FIRST_QUESTION  # what `meshllm up` tells a new user to ask: it must answer it


def consumer_spec(tmp_path: Path, **env: str) -> ServiceSpec:
    return ServiceSpec(
        name="effect-consumer",
        module="tests.procs.effect_consumer",
        env={
            "TEST_TOPIC": "test.supervised",
            "TEST_GROUP": "supervised",
            "TEST_EFFECTS": str(tmp_path / "effects.sqlite"),
            "PYTHONPATH": str(ROOT),
            **env,
        },
        ready_timeout_s=60,
    )


def settings(tmp_path: Path) -> MeshSettings:
    return MeshSettings(kafka={"bootstrap": f"127.0.0.1:{free_port()}"}, data_dir=tmp_path / "d")


async def test_services_start_ready_and_stop_cleanly(tmp_path: Path) -> None:
    out = io.StringIO()
    config = settings(tmp_path)
    supervisor = Supervisor(config, (consumer_spec(tmp_path),), out=out)
    stop = asyncio.Event()
    await ensure_topics_later(supervisor)
    run = asyncio.create_task(supervisor.run(stop))
    await poll_until(
        lambda: state_path(config).exists() or run.done(), timeout=90, message="state file"
    )
    assert not run.done(), out.getvalue()
    state = json.loads(state_path(config).read_text())
    assert set(state["services"]) == {"effect-consumer"}
    # each service's identity token, made before the services start (0600)
    tokens = config.data_dir / "run" / "service-tokens"
    for name in ("gateway", "router", "retrieval", "audit", "inference", "effect-consumer"):
        assert (tokens / f"{name}.token").stat().st_mode & 0o077 == 0, name

    status = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "meshllm", "status", "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "MESHLLM_DATA_DIR": str(config.data_dir)},
    )
    assert status.returncode == 0, status.stdout + status.stderr
    components = {c["name"]: c for c in json.loads(status.stdout)["components"]}
    assert components["broker"]["ready"]
    assert components["effect-consumer"]["ready"]
    assert "bus: ok" in components["effect-consumer"]["detail"]
    # its metrics, on the same port as its health, where status says
    scraped = await asyncio.to_thread(httpx.get, components["effect-consumer"]["metrics"])
    assert scraped.status_code == 200
    assert scraped.headers["content-type"].startswith("text/plain; version=0.0.4")

    stop.set()
    assert await run == 0, out.getvalue()
    log = out.getvalue()
    assert "effect-consumer | " in log  # child output is prefixed with its name
    assert "in memory only" in log
    assert supervisor.children[0].process.returncode == 0
    assert not state_path(config).exists()


async def ensure_topics_later(supervisor: Supervisor) -> None:
    """The supervised test topic is not in the registry: create it once the broker is up."""

    async def create() -> None:
        while supervisor.broker is None or not supervisor.broker.running():
            await asyncio.sleep(0.05)
        await ensure_topics(supervisor.bootstrap, [scratch_topic("test.supervised")])

    asyncio.get_running_loop().create_task(create())


async def test_a_dying_service_stops_the_mesh_and_is_named(tmp_path: Path) -> None:
    out = io.StringIO()
    supervisor = Supervisor(settings(tmp_path), (consumer_spec(tmp_path),), out=out)
    await ensure_topics_later(supervisor)
    run = asyncio.create_task(supervisor.run(asyncio.Event()))
    await poll_until(
        lambda: supervisor.children and supervisor.children[0].process.pid, message="child started"
    )
    await poll_until(
        lambda: "effect-consumer ready" in out.getvalue() or run.done(),
        timeout=90,
        message="child ready",
    )
    os.kill(supervisor.children[0].process.pid, signal.SIGKILL)
    assert await asyncio.wait_for(run, 60) == 1
    assert f"effect-consumer exited with code {-signal.SIGKILL}" in out.getvalue()
    assert supervisor.broker is not None
    assert not supervisor.broker.running()


async def test_a_misconfigured_service_fails_start_up_naming_the_setting(tmp_path: Path) -> None:
    out = io.StringIO()
    spec = consumer_spec(tmp_path, MESHLLM_BUS__MAX_ATTEMPTS="0")
    supervisor = Supervisor(settings(tmp_path), (spec,), out=out)
    assert await asyncio.wait_for(supervisor.run(asyncio.Event()), 90) == 1
    log = out.getvalue()
    assert "effect-consumer exited with code 2 before it was ready" in log
    assert "MESHLLM_BUS__MAX_ATTEMPTS" in log


def meshllm(*args: str, data_dir: Path, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "meshllm", *args],
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "MESHLLM_DATA_DIR": str(data_dir), **env},
    )


@pytest.mark.slow
@pytest.mark.timeout(480)
async def test_meshllm_up_then_down_from_the_command_line(tmp_path: Path) -> None:
    """The whole mesh on its defaults: the broker and every registered service, for real."""
    port, http_port, gateway_port = free_port(), free_port(), free_port()
    up = meshllm(
        "up",
        "--port",
        str(port),
        data_dir=tmp_path,
        MESHLLM_SERVE__HTTP_PORT=str(http_port),
        MESHLLM_HTTP_PORT=str(gateway_port),
        MESHLLM_POOLS=json.dumps([{"name": "cpu", "replicas": [f"http://127.0.0.1:{http_port}"]}]),
    )
    try:
        await poll_until(
            lambda: (tmp_path / "run" / "state.json").exists() or up.poll() is not None,
            timeout=300,
            message="meshllm up",
        )
        status = meshllm("status", data_dir=tmp_path)
        assert status.wait(30) == 0, status.stdout.read() if status.stdout else ""
        key = (tmp_path / "run" / "api-key").read_text().strip()
        async with httpx.AsyncClient(timeout=60) as client:
            reply = await client.post(
                f"http://127.0.0.1:{gateway_port}/v1/chat/completions",
                headers={"authorization": f"Bearer {key}"},
                json={
                    "model": "smollm2-135m-instruct",
                    "messages": [{"role": "user", "content": QUESTION}],
                    "temperature": 0,
                    "max_tokens": 20,
                },
            )
        assert reply.status_code == 200, reply.text
        assert "Paris" in reply.json()["choices"][0]["message"]["content"]
        chat = meshllm(
            "chat",
            QUESTION,
            data_dir=tmp_path,
            MESHLLM_HTTP_PORT=str(gateway_port),
        )
        answer = chat.stdout.read() if chat.stdout else ""
        assert chat.wait(60) == 0, answer
        assert "Paris" in answer
        # the ops loop at a terminal: the answers are in `meshllm top`, nothing is firing
        deadline = time.monotonic() + 60
        while True:
            top = meshllm("top", "--once", "--window", "300s", data_dir=tmp_path,
                          COLUMNS="200")  # fmt: skip
            shown = top.stdout.read() if top.stdout else ""
            assert top.wait(30) == 0, shown
            if "smollm2-135m-instruct" in shown:
                break
            assert time.monotonic() < deadline, shown
            await asyncio.sleep(1)
        assert "no alert firing" in shown
        alerts = meshllm("alerts", "--json", data_dir=tmp_path)
        listed = alerts.stdout.read() if alerts.stdout else ""
        assert alerts.wait(90) == 0, listed
        assert json.loads(listed) == []
    except BaseException:
        up.send_signal(signal.SIGINT)  # never leave a mesh running behind a failed test
        up.wait(120)
        raise
    down = meshllm("down", data_dir=tmp_path)
    assert down.wait(120) == 0
    output = up.stdout.read() if up.stdout else ""
    assert up.wait(60) == 0, output
    assert f"broker ready on 127.0.0.1:{port}" in output
    assert "inference ready" in output
    assert f"http://127.0.0.1:{gateway_port}/v1" in output
    assert "curl" in output
    assert f'"content": "{QUESTION}"' in output  # the curl line asks the question tested above
    assert key not in output.replace(str(tmp_path), "")  # the key is in a file, not the log
    assert "stopped cleanly" in output


async def test_meshllm_up_on_a_taken_port_says_so(tmp_path: Path, kafka_bootstrap: str) -> None:
    port = kafka_bootstrap.rpartition(":")[2]
    up = meshllm("up", "--port", port, data_dir=tmp_path)
    assert up.wait(60) == 1
    output = up.stdout.read() if up.stdout else ""
    assert f"port {port} on 127.0.0.1 is already in use" in output
    assert "MESHLLM_KAFKA__BOOTSTRAP" in output


def test_bad_settings_are_named(tmp_path: Path) -> None:
    status = meshllm("status", data_dir=tmp_path, MESHLLM_KAFKA__BOOTSTRAP="no-port")
    assert status.wait(30) == 2
    output = status.stdout.read() if status.stdout else ""
    assert "MESHLLM_KAFKA__BOOTSTRAP" in output
    assert "is not host:port" in output


async def test_clean_stop_drains_what_the_broker_already_accepted(tmp_path: Path) -> None:
    """Events accepted just before Ctrl-C are all handled before the in-memory broker stops."""
    import sqlite3

    from shared.bus import Bus
    from shared.events.v1 import events_pb2 as ev

    out = io.StringIO()
    config = settings(tmp_path)
    spec = consumer_spec(tmp_path, TEST_DELAY_MS="20", MESHLLM_BUS__MAX_BATCH="5")
    supervisor = Supervisor(config, (spec,), out=out)
    await ensure_topics_later(supervisor)
    stop = asyncio.Event()
    run = asyncio.create_task(supervisor.run(stop))
    await poll_until(
        lambda: "effect-consumer ready" in out.getvalue() or run.done(),
        timeout=90,
        message="child ready",
    )
    # the mesh's data dir: this producer signs with its key, as `meshllm up`'s consumers require
    bus = Bus(
        MeshSettings(kafka={"bootstrap": supervisor.bootstrap}, data_dir=config.data_dir),
        service="tests",
    )
    await bus.start()
    for i in range(100):
        await bus.publisher.enqueue(
            scratch_topic("test.supervised"), ev.FeedbackEvent(request_id=f"d{i}")
        )
    await bus.stop()  # flushes: all 100 are accepted by the broker
    stop.set()
    assert await asyncio.wait_for(run, 90) == 0, out.getvalue()
    with sqlite3.connect(tmp_path / "effects.sqlite") as db:
        handled = {row[0] for row in db.execute("SELECT request_id FROM effects")}
    assert handled == {f"d{i}" for i in range(100)}, out.getvalue()
