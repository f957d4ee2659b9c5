"""A test double for the bus publisher (``shared.bus.Publisher``): it records what it is
given, and can refuse the first ``refuse`` publishes as a broker that is away would.
Tests that use it test the logic above the bus; the bus itself is tested on a broker."""

from __future__ import annotations

from typing import Any

from google.protobuf.message import Message

from shared.topics import Topic


class RecordingPublisher:
    def __init__(self, refuse: int = 0) -> None:
        self.refuse = refuse
        self.sent: list[tuple[Topic, Message, str | bytes | None]] = []

    async def publish(
        self, topic: Topic, event: Message, *, key: str | bytes | None = None, **_: object
    ) -> None:
        if self.refuse:
            self.refuse -= 1
            raise ConnectionError("broker away")
        self.sent.append((topic, event, key))

    def on(self, topic: Topic) -> list[Any]:
        """The events published to ``topic``, in order."""
        return [event for sent_to, event, _ in self.sent if sent_to == topic]
