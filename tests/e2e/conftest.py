"""A whole mesh for end-to-end tests: real broker, real model, inference, router, gateway."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.gateway.auth import KeyStore
from shared.bus.embedded import free_port
from tests.conftest import ROOT, poll_until, start_process


@dataclass
class Service:
    module: str
    health_port: int
    env: dict[str, str]
    log: Path
    process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = {**self.env, "MESHLLM_HEALTH_PORT": str(self.health_port)}
        self.process = await start_process(self.module, env, self.log)

    async def ready(self, timeout: float) -> None:
        async def check() -> bool:
            if self.process is not None and self.process.returncode is not None:
                pytest.fail(f"{self.module} exited: {self.log.read_text()[-3000:]}")
            try:
                async with httpx.AsyncClient() as client:
                    reply = await client.get(f"http://127.0.0.1:{self.health_port}/readyz")
                return reply.status_code == 200
            except httpx.TransportError:
                return False

        deadline = asyncio.get_running_loop().time() + timeout
        while not await check():
            if asyncio.get_running_loop().time() > deadline:
                pytest.fail(
                    f"{self.module} not ready in {timeout:.0f}s: {self.log.read_text()[-3000:]}"
                )
            await asyncio.sleep(0.2)

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        self.process.send_signal(sig)
        try:
            await asyncio.wait_for(self.process.wait(), 60)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


@dataclass
class Mesh:
    base_url: str
    inference_url: str
    keys: dict[str, str]
    data_dir: Path
    services: dict[str, Service] = field(default_factory=dict)

    def logs(self) -> str:
        """Everything the services have logged so far."""
        return "".join(
            service.log.read_text(errors="replace") for service in self.services.values()
        )


SERVICES = ("inference", "retrieval", "router", "audit", "feedback", "trainer", "ops", "gateway")
# tenant initech has its audit text redacted; the others keep it (the default)
PII_TENANTS = {"initech": {"audit": {"enabled": True}}}


@pytest.fixture(scope="module")
async def mesh(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    data = tmp_path_factory.mktemp("mesh")
    with KeyStore(data / "gateway" / "keys.sqlite") as store:
        keys = {
            "admin": store.create("acme", ["admin"])[1],
            "user": store.create("acme", ["user"])[1],
            "limited": store.create("acme", ["user"], rpm=2)[1],
            "revoked": store.create("acme", ["user"])[1],
            "auditor": store.create("acme", ["auditor"])[1],
            "analyst": store.create("acme", ["analyst"])[1],
            "globex-auditor": store.create("globex", ["auditor"])[1],
            "initech": store.create("initech", ["analyst"])[1],
            "developer": store.create("acme", ["developer"])[1],
            "globex-analyst": store.create("globex", ["analyst"])[1],
            "globex-developer": store.create("globex", ["developer"])[1],
        }
        store.revoke(keys["revoked"].split("-")[1])
    inference_port, gateway_port, audit_port, kb_port, feedback_port, trainer_port = (
        free_port() for _ in range(6)
    )
    inference_url = f"http://127.0.0.1:{inference_port}"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        "MESHLLM_KAFKA__BOOTSTRAP": kafka_bootstrap,
        "MESHLLM_DATA_DIR": str(data),
        "MESHLLM_LOG_FORMAT": "json",
        "MESHLLM_SERVE__HTTP_PORT": str(inference_port),
        "MESHLLM_POOLS": json.dumps([{"name": "cpu", "replicas": [inference_url]}]),
        "MESHLLM_HTTP_PORT": str(gateway_port),
        "MESHLLM_REQUEST_TIMEOUT_S": "90",
        "MESHLLM_AUDIT_API_PORT": str(audit_port),
        "MESHLLM_AUDIT__SERVICE_URL": f"http://127.0.0.1:{audit_port}",
        "MESHLLM_CHECKPOINT_INTERVAL_S": "1",
        "MESHLLM_PII__TENANTS": json.dumps(PII_TENANTS),
        "MESHLLM_FEEDBACK_API_PORT": str(feedback_port),
        "MESHLLM_FEEDBACK__SERVICE_URL": f"http://127.0.0.1:{feedback_port}",
        "MESHLLM_AUDIT_URL": f"http://127.0.0.1:{audit_port}",
        "MESHLLM_TRAINER_API_PORT": str(trainer_port),
        "MESHLLM_TRAINING__SERVICE_URL": f"http://127.0.0.1:{trainer_port}",
        "MESHLLM_FEEDBACK_URL": f"http://127.0.0.1:{feedback_port}",
        "MESHLLM_TRAIN__CHECKPOINT_EVERY": "2",
        "MESHLLM_LEASE_S": "15",
        "MESHLLM_KB_API_PORT": str(kb_port),
        "MESHLLM_KB__SERVICE_URL": f"http://127.0.0.1:{kb_port}",
        "MESHLLM_RAG__RETRIEVAL_URL": f"http://127.0.0.1:{kb_port}",
        "MESHLLM_EMBEDDINGS_URL": inference_url,
        # whole traces on telemetry.spans (the default is the answer spans only): the
        # trace test follows one request through every service there
        "MESHLLM_TELEMETRY__KAFKA_SPANS": "all",
    }
    mesh = Mesh(f"http://127.0.0.1:{gateway_port}/v1", inference_url, keys, data)
    for name in SERVICES:
        mesh.services[name] = Service(f"services.{name}", free_port(), env, data / f"{name}.log")
    try:
        for service in mesh.services.values():
            await service.start()
        for name, service in mesh.services.items():
            await service.ready(timeout=300 if name == "inference" else 60)
        yield mesh
    finally:
        for name in reversed(SERVICES):
            await mesh.services[name].stop()


Samples = dict[str, list[tuple[dict[str, str], float]]]


async def scrape(mesh: Mesh, service: str) -> Samples:
    """{sample name: [(labels, value)]} of a service's /metrics on its health port."""
    port = mesh.services[service].health_port
    async with httpx.AsyncClient() as http:
        reply = await http.get(f"http://127.0.0.1:{port}/metrics")
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(
        value
        for found, value in samples.get(name, [])
        if all(found.get(k) == v for k, v in labels.items())
    )


__all__ = ["Mesh", "Samples", "Service", "poll_until", "scrape", "total"]
