"""``python -m services.inference``: run the inference Serve application.

The common life of a service (:func:`~shared.service.run_service`: settings, logging,
telemetry, the bus, health, shutdown), with: the bundled default model registered when the
registry lacks it, Ray started (locally, or joining ``MESHLLM_SERVE__RAY_ADDRESS``),
:func:`build_app` deployed with ``serve.run``. Ready means the chat deployment answered a
one-token request. SIGTERM or SIGINT shuts Serve and Ray down (in-flight requests get
``graceful_shutdown_timeout_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Awaitable
from typing import Any

from services.inference import metrics as inference_metrics
from services.inference.metrics import ReplicaStatuses
from services.inference.registry import ModelRegistry, UnknownModel, ensure_default
from services.inference.scaling import ReplicaControl
from services.inference.settings import InferenceSettings
from shared.bus import Bus
from shared.deployments import CHAT_DEPLOYMENT
from shared.health import HealthState
from shared.logging import get_logger
from shared.service import run_service
from shared.topics import OPS_SCALING

log = get_logger("services.inference")

NAME = "inference"
PROBE = {"prompt": "Hi", "max_tokens": 1, "temperature": 0}
PROBE_INTERVAL_S = 15.0

# A Ray started here: its workers (the replicas, so the engine) run at normal priority,
# not Ray's default niceness 15, under which any other process of the mesh, and the
# client, pre-empted the engine's threads. And it keeps quiet when nothing happens:
# Serve's controller looks at its deployments once a second, not ten times, and Ray's own
# metrics (which the mesh does not read; each service exports its own) are neither kept
# nor pushed every 100 ms; with Ray's defaults an idle replica set took ~10% of a core on
# two. Set any of these in the environment to have Ray's default or another value back.
RAY_ENV_DEFAULTS = {
    "RAY_worker_niceness": "0",
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "5000",
    "RAY_enable_metrics_collection": "0",
}


class Readiness:
    """What ``/readyz`` and ``/healthz`` report, updated by :meth:`probe_forever`."""

    def __init__(self) -> None:
        self.statuses = ReplicaStatuses(PROBE_INTERVAL_S)
        inference_metrics.report(self.statuses)
        self.deployed = False
        self.ready_problem: str | None = "the Serve application is starting"
        self.failure: str | None = None

    def readiness(self) -> str | None:
        return self.ready_problem

    def liveness(self) -> str | None:
        return self.failure

    async def probe_forever(self, chat: Any, app_name: str, control: ReplicaControl) -> None:
        """Until the chat deployment has answered a one-token request, send one; then ask
        its replicas for their status now and then (cheap: no generation while idle;
        Serve's own health check finds a stuck engine). Note the app's status from Serve."""
        from ray import serve

        answered = False
        while True:
            try:
                if not answered:
                    await asyncio.wait_for(chat.complete.remote(PROBE), 60)
                    answered = True
                self.statuses.note(await asyncio.wait_for(chat.status.remote(), 60))
                self.ready_problem = None
            except Exception as error:
                self.ready_problem = f"chat probe failed: {type(error).__name__}: {error}"[:500]
            try:
                status = await asyncio.to_thread(serve.status)
                app = status.applications.get(app_name)
                state = str(app.status) if app is not None else "missing"
                if app is not None:
                    control.running = {
                        name: sum(
                            count
                            for state, count in deployment.replica_states.items()
                            if state == "RUNNING"  # a str enum
                        )
                        for name, deployment in app.deployments.items()
                    }
                self.failure = f"application {app_name} is {state}" if "FAILED" in state else None
            except Exception as error:
                self.failure = f"Serve status unavailable: {error}"[:500]
            try:
                await asyncio.wait_for(control.report(), 10)
            except Exception as error:  # the next round tells it again
                log.warning("replica counts unpublished", error=f"{type(error).__name__}: {error}")
            await asyncio.sleep(PROBE_INTERVAL_S if self.ready_problem is None else 1.0)


def _check_model(registry: ModelRegistry, settings: InferenceSettings) -> str | None:
    """Register the default model if asked to; then why the configured one cannot be served."""
    try:
        if settings.register_default_model:
            ensure_default(registry)
        entry = registry.resolve(settings.model_name, settings.model_version)
    except (UnknownModel, ValueError) as error:  # ModelLoadError is a ValueError
        return str(error)
    log.info("serving model", model=entry.ref, quant=settings.quant)
    return None


def _start_ray(settings: InferenceSettings) -> float | None:
    """Start or join Ray and Serve; the CPUs of a Ray started here (None: a cluster)."""
    import ray
    from ray import serve

    s = settings.serve
    cpus = None
    if s.ray_address:
        ray.init(address=s.ray_address, namespace="meshllm")
    else:
        for name, value in RAY_ENV_DEFAULTS.items():
            os.environ.setdefault(name, value)  # the local Ray's processes inherit them
        ray.init(num_cpus=s.ray_num_cpus, namespace="meshllm", include_dashboard=False)
        cpus = float(ray.cluster_resources().get("CPU", 0.0))  # type: ignore[no-untyped-call]
    serve.start(http_options={"host": s.http_host, "port": s.http_port})
    return cpus


def _deploy(settings: InferenceSettings, external_scaling: bool) -> Any:
    """Deploy the application; returns a handle to the chat deployment."""
    from ray import serve

    from services.inference.serve_app import build_app

    serve.run(
        build_app(settings),
        name=settings.serve.app_name,
        route_prefix=settings.serve.route_prefix,
        external_scaler_enabled=external_scaling,
    )
    return serve.get_deployment_handle(CHAT_DEPLOYMENT, settings.serve.app_name)


def _shutdown() -> None:
    import ray
    from ray import serve

    with contextlib.suppress(Exception):
        serve.shutdown()  # type: ignore[no-untyped-call]
    with contextlib.suppress(Exception):
        ray.shutdown()


async def build(settings: InferenceSettings, bus: Bus, health: HealthState) -> Awaitable[None]:
    """Check the model, start Ray; the returned coroutine deploys and probes until stopped.

    Ray starts here, before :func:`~shared.service.serve` sets its signal handlers: its core
    worker installs one of its own for SIGTERM, which would otherwise win.

    Raises:
        RuntimeError: the configured model cannot be served (the message says why).
    """
    registry = ModelRegistry(settings.registry_dir)
    problem = await asyncio.to_thread(_check_model, registry, settings)
    if problem is not None:
        raise RuntimeError(f"no model to serve: {problem} (registry {registry.path})")
    readiness = Readiness()
    health.liveness["serve"] = readiness.liveness
    health.readiness["chat"] = readiness.readiness
    cpus = await asyncio.to_thread(_start_ray, settings)
    control = ReplicaControl(settings, bus.publisher, cpus)
    # every instance applies the decisions made from now on (a restart deploys its
    # configured counts; the ops loop decides again from what it then sees)
    instance = settings.instance_id or uuid.uuid4().hex[:12]
    bus.subscribe(
        OPS_SCALING, group=f"{NAME}-scaling-{instance}", durable_dedup=False, from_latest=True
    )(control.on_decision)
    return _serve(settings, readiness, control)


async def _serve(
    settings: InferenceSettings, readiness: Readiness, control: ReplicaControl
) -> None:
    """Deploy the application, then probe it until cancelled; Serve and Ray stop after."""
    try:
        chat = await asyncio.to_thread(_deploy, settings, control.external)
        control.deployed.set()
        log.info(
            "application deployed",
            http=f"http://{settings.serve.http_host}:{settings.serve.http_port}"
            f"{settings.serve.route_prefix}",
        )
        await readiness.probe_forever(chat, settings.serve.app_name, control)
    finally:
        await asyncio.shield(asyncio.to_thread(_shutdown))


def main() -> None:
    run_service(NAME, InferenceSettings, build)


if __name__ == "__main__":
    main()
