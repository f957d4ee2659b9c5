"""Replies from the router, handed to the HTTP request waiting for them.

Every gateway instance reads the whole reply topic in a consumer group of its own,
starting at the log end, and keeps the replies of the requests it has in flight;
the others are not its own and are dropped. Chunks are relayed once each: a chunk
whose sequence number was already relayed (the router ran the request again after a
crash) is dropped, so a client never sees text twice. The first final reply ends a
request; a later one for the same request is dropped.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from shared.bus import EventContext
from shared.events.v1 import events_pb2 as ev

Reply = ev.ReplyChunk | ev.FinalReply


@dataclass(eq=False)
class Pending:
    request_id: str
    queue: asyncio.Queue[Reply] = field(default_factory=asyncio.Queue)
    next_sequence: dict[int, int] = field(default_factory=dict)
    finished: bool = False

    def accept(self, reply: Reply) -> bool:
        """Whether ``reply`` is new for this request (and so should be relayed)."""
        if self.finished:
            return False
        if isinstance(reply, ev.FinalReply):
            self.finished = True
            return True
        expected = self.next_sequence.get(reply.choice_index, 0)
        if reply.sequence != expected:
            return False  # already relayed (a rerun), or a gap that the final reply fills
        self.next_sequence[reply.choice_index] = expected + 1
        return True


class ReplyRelay:
    def __init__(self) -> None:
        self._pending: dict[str, Pending] = {}
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._pending)

    def open(self, request_id: str) -> Pending:
        pending = Pending(request_id)
        self._pending[request_id] = pending
        return pending

    def close(self, request_id: str) -> None:
        self._pending.pop(request_id, None)

    async def on_reply(self, reply: Reply, ctx: EventContext) -> None:
        pending = self._pending.get(reply.request_id)
        if pending is None or not pending.accept(reply):
            self.dropped += 1
            return
        pending.queue.put_nowait(reply)
