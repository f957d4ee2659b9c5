"""``meshllm up``: the broker and every service as child processes, watched together.

Start-up: the services' identity tokens (once, under ``<data_dir>/run/service-tokens``,
0600; see :mod:`shared.service_auth`) → broker (embedded mode) → topics → each service in
order, each waited for until its ``/readyz`` answers 200. Then the supervisor watches: Ctrl-C or
SIGTERM shuts everything down cleanly (exit 0); a child that dies takes the mesh
down with it (exit 1, naming the child, its exit code and its last lines).

Clean shutdown order: edge services first (they take work from outside), then the
others in reverse start order; each one, on SIGTERM, first handles what the broker
already holds for it (its drain), commits, and flushes what it published. The
broker stops last. Services are listed downstream first, so a service's consumers
are still running while it drains into them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from meshllm.services import ServiceSpec
from shared.bus.admin import ensure_topics, wait_for_broker
from shared.bus.embedded import EmbeddedBroker, free_port
from shared.bus.signing import ensure_key, key_path
from shared.service_auth import IDENTITIES, ensure_tokens, tokens_dir
from shared.settings import LogFormat, MeshSettings, Mode

COLORS = ("36", "35", "33", "32", "34", "31")
STATE_FILE = "state.json"


class StartupError(RuntimeError):
    """The mesh could not start; the message says which part and why."""


@dataclass
class Child:
    spec: ServiceSpec
    process: asyncio.subprocess.Process
    health_port: int
    color: str
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=20))
    pumps: list[asyncio.Task[None]] = field(default_factory=list)


def state_path(settings: MeshSettings) -> Path:
    return Path(settings.data_dir) / "run" / STATE_FILE


class Supervisor:
    def __init__(
        self,
        settings: MeshSettings,
        specs: tuple[ServiceSpec, ...],
        *,
        out: IO[str] = sys.stdout,
        stop_timeout_s: float = 30.0,
        greeting: Sequence[str] = (),
    ) -> None:
        self.settings = settings
        self.greeting = list(greeting)
        self.specs = specs
        self.out = out
        self.stop_timeout_s = stop_timeout_s
        self.broker: EmbeddedBroker | None = None
        self.children: list[Child] = []
        self._color = out.isatty()

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap if self.broker else self.settings.kafka.bootstrap

    def say(self, message: str, name: str = "meshllm", color: str = "1") -> None:
        prefix = f"\x1b[{color}m{name:>10} |\x1b[0m" if self._color else f"{name:>10} |"
        print(f"{prefix} {message}", file=self.out, flush=True)

    async def run(self, stop: asyncio.Event) -> int:
        """Start everything, wait for ``stop`` or a dead child, shut down; return the exit code."""
        failed: Child | None = None
        try:
            self._make_service_tokens()
            await self._start_broker()
            for index, spec in enumerate(self.specs):
                await self._start_child(spec, COLORS[index % len(COLORS)])
            self._write_state()
            self._banner()
            failed = await self._watch(stop)
        except StartupError as error:
            self.say(f"start-up failed: {error}", color="31")
            failed = None
            await self._shutdown()
            return 1
        await self._shutdown()
        if failed is not None:
            code = failed.process.returncode
            self.say(f"{failed.spec.name} exited with code {code}; mesh stopped", color="31")
            for line in failed.tail:
                self.say(line, failed.spec.name, failed.color)
            return 1
        self.say("stopped cleanly")
        return 0

    def _make_service_tokens(self) -> None:
        """Each service's token and the mesh's event signing key, made once and kept:
        services restarted later still know each other. Set
        ``MESHLLM_SERVICE_AUTH__TOKENS_DIR`` to use tokens made elsewhere."""
        directory = tokens_dir(self.settings)
        try:
            ensure_tokens(directory, dict.fromkeys([*IDENTITIES, *(s.name for s in self.specs)]))
            ensure_key(key_path(self.settings))
        except OSError as error:
            raise StartupError(
                f"service tokens in {directory}: {error.strerror} "
                "(set MESHLLM_SERVICE_AUTH__TOKENS_DIR to a writable directory)"
            ) from None

    async def _start_broker(self) -> None:
        bootstrap = self.settings.kafka.bootstrap
        if self.settings.mode is Mode.EMBEDDED:
            host, _, port = bootstrap.split(",")[0].rpartition(":")
            log_file = Path(self.settings.data_dir) / "run" / "broker.log"
            log_file.parent.mkdir(parents=True, exist_ok=True)
            self.broker = EmbeddedBroker(host, int(port), log_file=log_file)
            try:
                await self.broker.start()
            except (RuntimeError, TimeoutError) as error:
                raise StartupError(
                    f"embedded broker on {bootstrap}: {error} "
                    "(set MESHLLM_KAFKA__BOOTSTRAP to another host:port)"
                ) from None
            self.say(f"broker ready on {self.bootstrap} (embedded, in memory)")
            return
        try:
            await wait_for_broker(bootstrap, timeout=60, kafka=self.settings.kafka)
            await ensure_topics(bootstrap, kafka=self.settings.kafka)
        except (TimeoutError, RuntimeError) as error:
            raise StartupError(f"Kafka at {bootstrap}: {error}") from None
        self.say(f"using Kafka at {bootstrap}")

    async def _start_child(self, spec: ServiceSpec, color: str) -> None:
        port = free_port(self.settings.health_host)
        env = {
            **os.environ,
            **spec.env,
            "MESHLLM_KAFKA__BOOTSTRAP": self.bootstrap,
            # where the tokens and the event key just made are (settings may not be from env)
            "MESHLLM_DATA_DIR": str(self.settings.data_dir),
            "MESHLLM_HEALTH_PORT": str(port),
            "MESHLLM_INSTANCE_ID": f"{spec.name}-{os.getpid()}",
            "PYTHONUNBUFFERED": "1",
        }
        # every producer of this mesh signs with its key, so its consumers can require it
        env.setdefault("MESHLLM_BUS__REQUIRE_SIGNED", "true")
        if "MESHLLM_LOG_FORMAT" not in os.environ and self.settings.log_format is LogFormat.AUTO:
            env["MESHLLM_LOG_FORMAT"] = "console" if self._color else "json"
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            spec.module,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        child = Child(spec, process, port, color)
        child.pumps.append(asyncio.create_task(self._pump(child)))
        self.children.append(child)
        self.say(f"starting {spec.name} (pid {process.pid})")
        await self._wait_ready(child)
        self.say(f"{spec.name} ready (health on :{port})")

    async def _pump(self, child: Child) -> None:
        assert child.process.stdout is not None
        async for raw in child.process.stdout:
            line = raw.decode(errors="replace").rstrip()
            child.tail.append(line)
            self.say(line, child.spec.name, child.color)

    async def _wait_ready(self, child: Child) -> None:
        deadline = time.monotonic() + child.spec.ready_timeout_s
        url = f"http://{self.settings.health_host}:{child.health_port}/readyz"
        async with httpx.AsyncClient(timeout=2) as client:
            while time.monotonic() < deadline:
                if child.process.returncode is not None:
                    await asyncio.gather(*child.pumps, return_exceptions=True)
                    last = child.tail[-1] if child.tail else "no output"
                    raise StartupError(
                        f"{child.spec.name} exited with code {child.process.returncode} "
                        f"before it was ready: {last}"
                    )
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(url)).status_code == 200:
                        return
                await asyncio.sleep(0.1)
        raise StartupError(
            f"{child.spec.name} not ready after {child.spec.ready_timeout_s:.0f}s ({url})"
        )

    async def _watch(self, stop: asyncio.Event) -> Child | None:
        stopper = asyncio.create_task(stop.wait())
        exits = {asyncio.create_task(c.process.wait()): c for c in self.children}
        broker_exit = asyncio.create_task(self._broker_exit())
        done, _ = await asyncio.wait(
            [stopper, broker_exit, *exits], return_when=asyncio.FIRST_COMPLETED
        )
        for task in [stopper, broker_exit, *exits]:
            if task not in done:
                task.cancel()
        for task, child in exits.items():
            if task in done:
                await asyncio.gather(*child.pumps, return_exceptions=True)
                return child
        if broker_exit in done:
            self.say("the embedded broker died; stopping the mesh", color="31")
            raise StartupError("embedded broker exited unexpectedly")
        return None

    async def _broker_exit(self) -> None:
        if self.broker is None:
            await asyncio.Event().wait()
        while self.broker is not None and self.broker.running():
            await asyncio.sleep(0.5)

    async def _shutdown(self) -> None:
        edge = [c for c in self.children if c.spec.edge]
        inner = [c for c in self.children if not c.spec.edge]
        await self._stop_children(edge)
        await self._stop_children(list(reversed(inner)))
        if self.broker is not None:
            await self.broker.stop()
            self.say("broker stopped (its in-memory events are gone)")
        with contextlib.suppress(FileNotFoundError):
            state_path(self.settings).unlink()

    async def _stop_children(self, children: list[Child]) -> None:
        for child in children:
            if child.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGTERM)
        for child in children:
            try:
                await asyncio.wait_for(child.process.wait(), self.stop_timeout_s)
            except TimeoutError:
                self.say(f"{child.spec.name} ignored SIGTERM; killing it", color="31")
                child.process.kill()
                await child.process.wait()
            await asyncio.gather(*child.pumps, return_exceptions=True)

    def _write_state(self) -> None:
        path = state_path(self.settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "pid": os.getpid(),
            "started_at": time.time(),
            "mode": self.settings.mode.value,
            "bootstrap": self.bootstrap,
            "broker_pid": self.broker.pid if self.broker else None,
            "health_host": self.settings.health_host,
            "services": {
                c.spec.name: {"pid": c.process.pid, "health_port": c.health_port}
                for c in self.children
            },
        }
        path.write_text(json.dumps(state, indent=2))

    def _banner(self) -> None:
        names = ", ".join(c.spec.name for c in self.children) or "none yet"
        self.say(f"mesh up: broker {self.bootstrap}; services: {names}")
        if self.broker is not None:
            self.say(
                "the embedded broker keeps events in memory only: stopping it loses them "
                "(use MESHLLM_MODE=cluster with Apache Kafka for durability)",
                color="33",
            )
        for line in self.greeting:
            self.say(line, color="32")
        self.say("Ctrl-C stops everything; `meshllm status` shows what runs")
