"""Replies from the router, turned into the text a client is sent exactly once.

Every gateway instance reads the whole reply topic in a consumer group of its own,
starting at the log end, and keeps the replies of the requests it has in flight;
the others are not its own and are dropped.

A request may be *run* more than once: the router retries a replica that failed
mid-stream on another one, and re-runs a request redelivered after a router crash.
Each run numbers its chunks from 0 and names itself (``ReplyChunk.run``). The relay
rebuilds each run's text in sequence order (a duplicate is dropped, a chunk that
arrives early waits for the ones before it) and hands the client only text that
extends what the client already has:

- a run whose text so far is a prefix of what was sent is catching up: nothing is sent;
- a run whose text extends what was sent continues the stream from that character
  offset (so runs may cut their text into chunks differently);
- a run whose text contradicts what was sent *diverged* (a vLLM replica, another
  model build, a sampling engine that is not batch-invariant): the stream ends with
  :class:`Diverged`, never with a spliced answer.

The final reply is checked the same way and fills any text the chunks left out, so a
stream that completes carries exactly the final reply's text, which is also what the
audit record holds. The first final reply ends a request; anything later is dropped.
A run that was superseded by a newer one is ignored from then on.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from shared.bus import EventContext
from shared.events.v1 import events_pb2 as ev

Reply = ev.ReplyChunk | ev.FinalReply


@dataclass(frozen=True)
class Delta:
    """New text of one choice, to be sent to the client as it is."""

    choice_index: int
    text: str


@dataclass(frozen=True)
class Diverged:
    """A run's text contradicts what the client was already sent; the stream must end."""

    choice_index: int
    sent: str
    run_text: str


Relayed = Delta | Diverged | ev.FinalReply


@dataclass
class _Run:
    """One run's chunks, rebuilt in sequence order per choice."""

    name: str
    next_sequence: dict[int, int] = field(default_factory=dict)
    early: dict[int, dict[int, str]] = field(default_factory=dict)
    text: dict[int, str] = field(default_factory=dict)

    def add(self, chunk: ev.ReplyChunk) -> bool:
        """Take ``chunk``; whether the run's text of its choice grew."""
        index = chunk.choice_index
        expected = self.next_sequence.get(index, 0)
        if chunk.sequence < expected:
            return False  # a duplicate
        waiting = self.early.setdefault(index, {})
        waiting[chunk.sequence] = chunk.delta
        grew = False
        while expected in waiting:
            self.text[index] = self.text.get(index, "") + waiting.pop(expected)
            expected += 1
            grew = True
        self.next_sequence[index] = expected
        return grew


@dataclass(eq=False)
class Pending:
    """One request's replies: what the client was sent, and the queue of what comes next."""

    request_id: str
    stream: bool = True
    queue: asyncio.Queue[Relayed] = field(default_factory=asyncio.Queue)
    sent: dict[int, str] = field(default_factory=dict)
    finished: bool = False
    _run: _Run | None = None
    _superseded: set[str] = field(default_factory=set)

    def accept(self, reply: Reply) -> bool:
        """Queue what ``reply`` adds for the client; whether it added anything."""
        if self.finished:
            return False
        if isinstance(reply, ev.FinalReply):
            return self._final(reply)
        if not self.stream or reply.run in self._superseded:
            return False
        if self._run is None or self._run.name != reply.run:
            if self._run is not None:
                self._superseded.add(self._run.name)
            self._run = _Run(reply.run)
        if not self._run.add(reply):
            return False
        return self._extend(reply.choice_index, self._run.text[reply.choice_index])

    def _extend(self, index: int, text: str, *, final: bool = False) -> bool:
        """Send what ``text`` (a run's text of choice ``index`` so far, or its final
        text) adds to what the client was sent; end the stream if it contradicts it."""
        sent = self.sent.get(index, "")
        if text.startswith(sent):
            if len(text) == len(sent):
                return False
            self.sent[index] = text
            self.queue.put_nowait(Delta(index, text[len(sent) :]))
            return True
        if not final and sent.startswith(text):
            return False  # a re-run catching up with what the client has
        self.finished = True
        self.queue.put_nowait(Diverged(index, sent, text))
        return True

    def _final(self, reply: ev.FinalReply) -> bool:
        if self.stream and not reply.HasField("error"):
            final_text = {choice.index: choice.text for choice in reply.choices}
            for index in sorted(set(self.sent) | set(final_text)):
                self._extend(index, final_text.get(index, ""), final=True)
                if self.finished:
                    return True  # diverged: the Diverged item ends the stream
        self.finished = True
        self.queue.put_nowait(reply)
        return True


class ReplyRelay:
    """The pending requests of this gateway instance, fed from the reply topic."""

    def __init__(self) -> None:
        self._pending: dict[str, Pending] = {}
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._pending)

    def open(self, request_id: str, *, stream: bool = True) -> Pending:
        pending = Pending(request_id, stream)
        self._pending[request_id] = pending
        return pending

    def close(self, request_id: str) -> None:
        self._pending.pop(request_id, None)

    def accept(self, reply: Reply) -> None:
        """Route ``reply`` to its pending request, if this instance has it."""
        pending = self._pending.get(reply.request_id)
        if pending is None or not pending.accept(reply):
            self.dropped += 1

    async def on_reply(self, reply: Reply, ctx: EventContext) -> None:
        self.accept(reply)
