"""The ops loop's replica decisions applied by the real inference service through Ray Serve.

``python -m services.inference`` (the real model) on a broker of its own: a
``ScalingDecision`` on ``ops.scaling`` starts a second chat replica beside the first
(Serve's external-scaler API), a forged one asking for a thousand gets the bound, and one
back to a single replica stops the extra one; ``model.status`` tells each count. The
policy that decides is tested in tests/ops/test_scaling.py; the whole loop under load
(slowdown, alert, scale-out, recovery) is ``meshbench/ops_loop.py``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from shared.bus import Bus
from shared.bus.embedded import EmbeddedBroker, free_port
from shared.events.v1 import events_pb2 as ev
from shared.settings import MeshSettings
from shared.topics import MODEL_STATUS, OPS_SCALING
from tests.conftest import ROOT, poll_until, start_process

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(420)]

CHAT = "ChatDeployment"


async def test_decisions_change_the_running_replicas(tmp_path: Path) -> None:
    broker = EmbeddedBroker(log_file=tmp_path / "broker.log")
    await broker.start()
    statuses: list[ev.ModelStatus] = []
    bus = Bus(MeshSettings(kafka={"bootstrap": broker.bootstrap}, data_dir=tmp_path / "t"),
              service="ops")  # fmt: skip

    async def on_status(status: ev.ModelStatus, ctx: object) -> None:
        if status.deployment == CHAT:
            statuses.append(status)

    bus.subscribe(MODEL_STATUS, group="tests", durable_dedup=False)(on_status)
    await bus.start()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MESHLLM_KAFKA__BOOTSTRAP": broker.bootstrap,
        "MESHLLM_DATA_DIR": str(tmp_path / "data"),
        "MESHLLM_LOG_FORMAT": "json",
        "MESHLLM_HEALTH_PORT": str(free_port()),
        "MESHLLM_SERVE__HTTP_PORT": str(free_port()),
        "MESHLLM_SERVE__EMBEDDINGS_REPLICAS": "0",
        "MESHLLM_SERVE__CHAT_NUM_CPUS": "0.5",
        "MESHLLM_SERVE__CHAT_MAX_REPLICAS": "2",
        "MESHLLM_TORCH_THREADS": "1",
    }
    log = tmp_path / "inference.log"
    process = await start_process("services.inference", env, log)

    def seen(replicas: int, running: int) -> bool:
        if process.returncode is not None:
            pytest.fail(f"inference exited: {log.read_text()[-3000:]}")
        return any(s.replicas == replicas and s.running_replicas == running for s in statuses)

    async def decide(target: int) -> None:
        decision = ev.ScalingDecision(deployment=CHAT, current_replicas=1,
                                      target_replicas=target, reason="p99: test")  # fmt: skip
        await bus.publisher.publish(OPS_SCALING, decision, key=CHAT)

    try:
        await poll_until(lambda: seen(1, 1), timeout=300, interval=0.5, message="one replica")
        assert statuses[-1].max_replicas == 2  # its bound, which fits this machine
        statuses.clear()
        await decide(2)
        await poll_until(lambda: seen(2, 2), timeout=120, interval=0.5, message="two replicas")
        statuses.clear()
        await decide(1000)  # forged: bounded to the most it runs, which it runs already
        await poll_until(lambda: statuses, timeout=30, interval=0.2, message="a status")
        assert {(s.replicas, s.max_replicas) for s in statuses} == {(2, 2)}
        await decide(1)
        await poll_until(lambda: seen(1, 1), timeout=120, interval=0.5, message="back to one")
        assert "replicas changed" in log.read_text()
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            await process.wait()
        await bus.stop()
        await broker.stop()
