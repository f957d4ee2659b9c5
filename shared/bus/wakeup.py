"""Local wake-ups: how consumers of the embedded broker sleep without polling it.

Apache Kafka holds a fetch until data arrives, so a consumer may wait there for
hundreds of milliseconds at no cost. The embedded broker does not: a waiting fetch
re-reads its storage on a timer, so low hop latency used to mean a fetch every few
milliseconds from every consumer, about 0.85 of a core for an idle mesh on two.

On one machine the producers can say when there is something to read. After the
broker acknowledges a record, the producer sends its partition and offset as a
datagram to every consumer socket of that topic (:class:`Waker`). A consumer that
has read everything it was told of pauses its partitions and sleeps on its sockets
(:class:`WakeListener`); a datagram makes it fetch at once, and it keeps fetching
until its position passes every offset it was told of. So a record announced by a
producer is never left waiting for the next poll, whatever the event loops' timing,
and a record from a producer that announces nothing (another machine, another tool)
is read within ``bus.idle_poll_ms``.

The sockets are files under a directory private to this user (mode 0700, checked
before use), one sub-directory per topic, keyed by the broker's address. A datagram
is only a hint: at worst a bad one makes a consumer fetch once more than it needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import socket
import stat
import struct
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from aiokafka import TopicPartition

from shared.logging import get_logger
from shared.settings import MeshSettings

log = get_logger(__name__)

_HINT = struct.Struct(">iq")  # partition, offset; a datagram holds one or more
_MAX_PARTITIONS_PER_DATAGRAM = 256
_RESEND_AFTER_S = 0.002
_RESENDS = 5
_MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux, fewer elsewhere


def wake_directory(settings: MeshSettings) -> Path | None:
    """The directory of this broker's wake sockets, or None when wake-ups are off or the
    directory is not private to this user (then consumers poll, as on Apache Kafka)."""
    if not settings.local_wakeup or not hasattr(socket, "AF_UNIX"):
        return None
    base = Path(tempfile.gettempdir()) / f"meshllm-{os.getuid()}"
    digest = hashlib.sha256(settings.kafka.bootstrap.encode()).hexdigest()[:12]
    directory = base / f"bus-{digest}"
    for path in (base, directory):
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
        problem = _not_private(path)
        if problem:
            log.warning("local wake-ups off: consumers poll", path=str(path), why=problem)
            return None
    return directory


def _not_private(path: Path) -> str | None:
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode):
        return "not a directory (or a symbolic link)"
    if info.st_uid != os.getuid():
        return "owned by another user"
    if info.st_mode & 0o077:
        return f"open to others (mode {stat.S_IMODE(info.st_mode):o})"
    return None


class Waker:
    """The producer side: announce acknowledged records to the topic's sleeping consumers.

    Announcements made in one turn of the event loop go out together: one datagram per
    consumer socket, holding each partition's highest offset. A socket whose queue is
    full (its consumer is busy) is sent the announcement again a little later, a few
    times, so the last records of a burst are not left to the idle poll.
    """

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        self._pending: dict[str, dict[int, int]] = {}
        self._resend: dict[tuple[str, str], tuple[bytes, int]] = {}
        self._scheduled = False
        self._listings: dict[str, tuple[int, list[str]]] = {}

    def announce(self, topic: str, partition: int, offset: int) -> None:
        """Record that ``topic``/``partition`` holds ``offset``; sent at the end of this turn."""
        offsets = self._pending.setdefault(topic, {})
        if offset > offsets.get(partition, -1):
            offsets[partition] = offset
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def close(self) -> None:
        self._socket.close()

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, {}
        for topic, offsets in pending.items():
            items = list(offsets.items())[:_MAX_PARTITIONS_PER_DATAGRAM]
            payload = b"".join(_HINT.pack(p, o) for p, o in items)
            for name in self._listeners(topic):
                path = str(self._directory / topic / name)
                self._resend.pop((topic, path), None)  # this one is newer
                self._send(topic, path, payload, _RESENDS)

    def _send(self, topic: str, path: str, payload: bytes, resends: int) -> None:
        try:
            self._socket.sendto(payload, path)
        except BlockingIOError:
            if resends > 0:  # its queue is full: the consumer is busy; try again shortly
                self._resend[(topic, path)] = (payload, resends - 1)
                asyncio.get_running_loop().call_later(_RESEND_AFTER_S, self._retry, topic, path)
        except (ConnectionRefusedError, FileNotFoundError):
            # nobody is bound there any more (a consumer that died): tidy it away
            with contextlib.suppress(OSError):
                os.unlink(path)
        except OSError as error:
            log.debug("wake-up not sent", path=path, error=str(error))

    def _retry(self, topic: str, path: str) -> None:
        queued = self._resend.pop((topic, path), None)
        if queued is not None and self._socket.fileno() != -1:  # not closed since
            self._send(topic, path, *queued)

    def _listeners(self, topic: str) -> list[str]:
        folder = self._directory / topic
        try:
            changed = folder.stat().st_mtime_ns
        except FileNotFoundError:
            return []
        cached = self._listings.get(topic)
        if cached is None or cached[0] != changed:
            cached = (changed, [e.name for e in os.scandir(folder) if e.name.endswith(".sock")])
            self._listings[topic] = cached
        return cached[1]


class WakeListener:
    """The consumer side: sockets for its topics, and the offsets producers announced.

    ``behind(position)`` says whether an announced record has not been read yet; a
    consumer sleeps (:meth:`sleep`) only when it is not behind.
    """

    def __init__(self, directory: Path, topics: Iterable[str], *, forget_after_s: float) -> None:
        self._directory = directory
        self._topics = list(topics)
        self._forget_after_s = forget_after_s
        self._sockets: list[tuple[str, socket.socket]] = []
        self._paths: list[Path] = []
        self._announced: dict[TopicPartition, tuple[int, float]] = {}
        self._woken = asyncio.Event()

    def open(self) -> None:
        """Bind one socket per topic (raises OSError when that is impossible)."""
        loop = asyncio.get_running_loop()
        name = f"{os.getpid()}-{secrets.token_hex(6)}.sock"
        try:
            for topic in self._topics:
                sock = self._bind(self._directory / topic, name)
                self._sockets.append((topic, sock))
                loop.add_reader(sock.fileno(), self._read, topic, sock)
        except BaseException:
            self.close()
            raise

    def _bind(self, folder: Path, name: str) -> socket.socket:
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
        path = folder / name
        if len(str(path)) > _MAX_SOCKET_PATH:
            raise OSError(f"socket path too long: {path}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            sock.bind(str(path))
        except BaseException:
            sock.close()
            raise
        self._paths.append(path)
        return sock

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for _, sock in self._sockets:
            loop.remove_reader(sock.fileno())
            sock.close()
        for path in self._paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._sockets.clear()
        self._paths.clear()

    def behind(self, positions: dict[TopicPartition, int]) -> bool:
        """Whether an announced offset of one of these partitions is not yet read;
        announcements already read, or older than ``forget_after_s``, are dropped."""
        now = time.monotonic()
        behind = False
        for tp, (offset, at) in list(self._announced.items()):
            position = positions.get(tp)
            if now - at > self._forget_after_s or (position is not None and position > offset):
                del self._announced[tp]
            elif position is not None:
                behind = True
        return behind

    async def sleep(self, timeout_s: float, *also: asyncio.Event) -> bool:
        """Until a producer announces something, one of ``also`` is set, or the timeout;
        False after the timeout."""
        self._woken.clear()
        waiters = [asyncio.ensure_future(event.wait()) for event in (self._woken, *also)]
        try:
            done, _ = await asyncio.wait(
                waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for waiter in waiters:
                waiter.cancel()
        return bool(done)

    def _read(self, topic: str, sock: socket.socket) -> None:
        now = time.monotonic()
        while True:
            try:
                payload = sock.recv(_HINT.size * _MAX_PARTITIONS_PER_DATAGRAM)
            except OSError:  # BlockingIOError: all read
                break
            if not payload or len(payload) % _HINT.size:
                continue
            for partition, offset in _HINT.iter_unpack(payload):
                tp = TopicPartition(topic, partition)
                known = self._announced.get(tp)
                if known is None or offset > known[0]:
                    self._announced[tp] = (offset, now)
        self._woken.set()
