"""``python -m services.inference``: run the inference Serve application.

Starts Ray (locally, or joins ``MESHLLM_SERVE__RAY_ADDRESS``), registers the bundled
default model when the registry lacks it, deploys :func:`build_app` with
``serve.run``, and answers ``/healthz`` and ``/readyz`` on ``MESHLLM_HEALTH_PORT``.
Ready means the chat deployment answered a one-token request. SIGTERM or SIGINT shuts
Serve and Ray down (in-flight requests get ``graceful_shutdown_timeout_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from typing import Any

from services.inference.registry import ModelRegistry, UnknownModel, ensure_default
from services.inference.settings import InferenceSettings
from shared.health import HealthServer, HealthState
from shared.logging import configure_logging, get_logger
from shared.settings import SettingsError, load_settings

log = get_logger("services.inference")

NAME = "inference"
PROBE = {"prompt": "Hi", "max_tokens": 1, "temperature": 0}
PROBE_INTERVAL_S = 15.0


class Readiness:
    """What ``/readyz`` and ``/healthz`` report, updated by :meth:`probe_forever`."""

    def __init__(self) -> None:
        self.deployed = False
        self.ready_problem: str | None = "the Serve application is starting"
        self.failure: str | None = None

    def readiness(self) -> str | None:
        return self.ready_problem

    def liveness(self) -> str | None:
        return self.failure

    async def probe_forever(self, chat: Any, app_name: str) -> None:
        """Send a one-token request now and then; note the app's status from Serve."""
        from ray import serve

        while True:
            try:
                await asyncio.wait_for(chat.complete.remote(PROBE), 60)
                self.ready_problem = None
            except Exception as error:
                self.ready_problem = f"chat probe failed: {type(error).__name__}: {error}"[:500]
            try:
                status = await asyncio.to_thread(serve.status)
                app = status.applications.get(app_name)
                state = str(app.status) if app is not None else "missing"
                self.failure = f"application {app_name} is {state}" if "FAILED" in state else None
            except Exception as error:
                self.failure = f"Serve status unavailable: {error}"[:500]
            await asyncio.sleep(PROBE_INTERVAL_S if self.ready_problem is None else 1.0)


def _on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)


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


def _start_ray(settings: InferenceSettings) -> None:
    import ray
    from ray import serve

    s = settings.serve
    if s.ray_address:
        ray.init(address=s.ray_address, namespace="meshllm")
    else:
        ray.init(num_cpus=s.ray_num_cpus, namespace="meshllm", include_dashboard=False)
    serve.start(http_options={"host": s.http_host, "port": s.http_port})


def _deploy(settings: InferenceSettings) -> Any:
    """Deploy the application; returns a handle to the chat deployment."""
    from ray import serve

    from services.inference.serve_app import CHAT_DEPLOYMENT, build_app

    serve.run(
        build_app(settings),
        name=settings.serve.app_name,
        route_prefix=settings.serve.route_prefix,
    )
    return serve.get_deployment_handle(CHAT_DEPLOYMENT, settings.serve.app_name)


def _shutdown() -> None:
    import ray
    from ray import serve

    with contextlib.suppress(Exception):
        serve.shutdown()  # type: ignore[no-untyped-call]
    with contextlib.suppress(Exception):
        ray.shutdown()


async def run(settings: InferenceSettings) -> int:
    """Run until SIGTERM/SIGINT; 0 after a clean stop, 1 when start-up failed."""
    registry = ModelRegistry(settings.registry_dir)
    problem = await asyncio.to_thread(_check_model, registry, settings)
    if problem is not None:
        log.error("no model to serve", error=problem, registry=str(registry.path))
        return 1

    readiness = Readiness()
    health = HealthState(service=NAME)
    health.liveness["serve"] = readiness.liveness
    health.readiness["chat"] = readiness.readiness
    server = HealthServer(health, settings.health_host, settings.health_port)
    await server.start()

    stop = asyncio.Event()
    _on_signals(stop)

    code = 0
    probe: asyncio.Task[None] | None = None
    try:
        await asyncio.to_thread(_start_ray, settings)
        _on_signals(stop)  # again: Ray's core worker installs its own SIGTERM handler
        deploy = asyncio.ensure_future(asyncio.to_thread(_deploy, settings))
        waiter = asyncio.ensure_future(stop.wait())
        await asyncio.wait([deploy, waiter], return_when=asyncio.FIRST_COMPLETED)
        if deploy.done():
            chat = deploy.result()
            log.info(
                "service started",
                health_port=server.port,
                pid=os.getpid(),
                http=f"http://{settings.serve.http_host}:{settings.serve.http_port}"
                f"{settings.serve.route_prefix}",
            )
            probe = asyncio.create_task(
                readiness.probe_forever(chat, settings.serve.app_name), name="probe"
            )
            await waiter
        else:
            deploy.cancel()
    except Exception as error:
        log.exception("start-up failed", error=f"{type(error).__name__}: {error}")
        code = 1
    finally:
        log.info("service stopping")
        if probe is not None:
            probe.cancel()
            await asyncio.gather(probe, return_exceptions=True)
        await asyncio.to_thread(_shutdown)
        await server.stop()
    log.info("service stopped", code=code)
    return code


def main() -> None:
    try:
        settings = load_settings(InferenceSettings, service_name=NAME)
    except SettingsError as error:
        print(f"{NAME}: {error}", file=sys.stderr)
        sys.exit(2)
    configure_logging(NAME, settings.log_level, settings.log_format, settings.pii)
    code = 1
    with contextlib.suppress(KeyboardInterrupt):
        code = asyncio.run(run(settings))
    sys.exit(code)


if __name__ == "__main__":
    main()
