"""A rated answer joined with what was asked and answered: the feedback service's unit.

No I/O here. :func:`join` takes one ``FeedbackEvent`` and the audit records of its request
(decoded as the audit API returns them) and gives an :class:`Example`; the service redacts
it for the ``feedback`` purpose (:meth:`Example.redacted`) and stores it.

Ratings come as ``up``/``down`` or as a 1-5 score. Both are kept: ``rating`` on the
event's -1/0/+1 scale (a score of 1-2 is -1, 3 is 0, 4-5 is +1) and ``score`` as given
(0 when the rating was up/down). :attr:`Example.stars` puts both on the 1-5 scale (up is 5,
down is 1), which is what a dataset's ``min_rating`` filters on.

One caller's rating of one answer is one example: its key is (tenant, request id,
subject), and a later rating replaces an earlier one (:attr:`Example.rated_at_ns` decides,
so a redelivered old event cannot undo a newer one).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from shared.events.v1 import events_pb2 as ev
from shared.feedback_requests import iso_ns

KINDS = {"REQUEST_KIND_CHAT": "chat", "REQUEST_KIND_COMPLETION": "completion"}
"""The audited request kinds an answer can be rated for (embeddings have no answer)."""


class JoinError(ValueError):
    """The audit records cannot make an example (the message says why)."""


class NotYet(JoinError):
    """A record the example needs is not in the audit log yet (it is written a moment
    after the answer): worth asking again."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Example:
    """One rated answer with its request and response, as stored."""

    tenant: str
    request_id: str
    subject: str  # who rated: the authenticated caller
    api_key_id: str
    rating: int  # -1, 0, +1
    score: int  # 1..5, or 0 when the rating was up/down
    labels: tuple[str, ...]
    correction: str
    comment: str
    model: str
    model_version: str
    kind: str  # "chat" or "completion"
    messages: tuple[Message, ...]  # a completion's prompt is one "user" message
    answer: str
    finish_reason: str
    retrieved_chunk_ids: tuple[str, ...]
    rated_at_ns: int
    answered_at_ns: int
    event_id: str  # the FeedbackEvent's
    redactions: int = 0  # PII values the feedback policy replaced
    # the messages the model was given when the router changed the caller's (the knowledge
    # base's sources in the last user turn, as the router's routing record holds them)
    prompt: tuple[Message, ...] = ()

    @property
    def feedback_id(self) -> str:
        """Stable per (tenant, request id, subject): the id a re-rating keeps."""
        return feedback_id(self.tenant, self.request_id, self.subject)

    @property
    def stars(self) -> int:
        """The rating on the 1-5 scale: the score if one was given, else up 5 / down 1 /
        neutral 3."""
        return self.score or {1: 5, 0: 3, -1: 1}[self.rating]

    def redacted(self, redact: Callable[[str], tuple[str, int]]) -> Example:
        """Every free-text field through ``redact`` (text -> (text, values replaced))."""
        count = 0

        def clean(text: str) -> str:
            nonlocal count
            if not text:
                return text
            cleaned, found = redact(text)
            count += found
            return cleaned

        return replace(
            self,
            messages=tuple(Message(m.role, clean(m.content)) for m in self.messages),
            prompt=tuple(Message(m.role, clean(m.content)) for m in self.prompt),
            answer=clean(self.answer),
            correction=clean(self.correction),
            comment=clean(self.comment),
            labels=tuple(clean(label) for label in self.labels),
            redactions=self.redactions + count,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.feedback_id,
            "object": "feedback",
            "request_id": self.request_id,
            "subject": self.subject,
            "api_key_id": self.api_key_id,
            "rating": {1: "up", 0: "neutral", -1: "down"}[self.rating],
            "score": self.score or None,
            "labels": list(self.labels),
            "correction": self.correction or None,
            "comment": self.comment or None,
            "model": self.model,
            "model_version": self.model_version,
            "kind": self.kind,
            "messages": [{"role": m.role, "content": m.content} for m in self.messages],
            "prompt": [{"role": m.role, "content": m.content} for m in self.prompt] or None,
            "answer": self.answer,
            "finish_reason": self.finish_reason,
            "retrieved_chunk_ids": list(self.retrieved_chunk_ids),
            "rated_at_ns": self.rated_at_ns,
            "answered_at_ns": self.answered_at_ns,
            "pii_redactions": self.redactions,
        }


def feedback_id(tenant: str, request_id: str, subject: str) -> str:
    digest = hashlib.sha256("\0".join((tenant, request_id, subject)).encode()).hexdigest()
    return "fb_" + digest[:32]


def rating_of(score: int) -> int:
    """A 1-5 score on the -1/0/+1 scale."""
    return -1 if score <= 2 else (0 if score == 3 else 1)


def join(
    event: ev.FeedbackEvent,
    envelope: ev.Envelope,
    records: Sequence[Mapping[str, Any]],
    *,
    routing_overdue: bool = False,
) -> Example:
    """The example of ``event``, from the audit records of its request (the audit API's
    JSON: ``kind``, ``model``, ``model_version``, ``occurred_at`` and the decoded ``event``).

    An answer from knowledge-base sources also needs the router's routing record: it holds
    the prompt the model was given, sources included, which becomes :attr:`Example.prompt`
    (``routing_overdue``: it will not come; the example is made without it).

    Raises:
        NotYet: no records, a request without its response, or a sourced answer without
            its routing record.
        JoinError: a response without its request, content purged, or not an answer.
    """
    request = _one(records, "request")
    response = _one(records, "response")
    if request is None and response is not None:
        raise JoinError(f"the audit log has a response of {event.request_id} but no request")
    if request is None or response is None:
        missing = "request" if request is None else "response"
        raise NotYet(f"the audit log has no {missing} record of {event.request_id} yet")
    if request.get("event") is None or response.get("event") is None:
        raise JoinError(f"the content of {event.request_id} was purged from the audit log")
    asked = request["event"].get("request", {})
    kind = KINDS.get(asked.get("kind", ""))
    if kind is None:
        raise JoinError(f"{event.request_id} is not a chat or completion request")
    if kind == "chat":
        messages = tuple(
            Message(str(m.get("role", "")), str(m.get("content", "")))
            for m in asked.get("messages", [])
        )
    else:
        messages = tuple(Message("user", str(text)) for text in asked.get("inputs", [])[:1])
    answered = response["event"].get("response", {})
    choices = answered.get("choices", [])
    first = choices[0] if choices else {}
    sourced = bool(answered.get("retrieved_chunk_ids")) and not routing_overdue
    prompt = _prompt(event.request_id, records, sourced=sourced)
    return Example(
        tenant=envelope.tenant,
        request_id=event.request_id,
        subject=event.user,
        api_key_id=event.api_key_id,
        rating=event.rating,
        score=event.score,
        labels=tuple(event.labels),
        correction=event.correction,
        comment=event.comment,
        model=str(response.get("model") or request.get("model") or ""),
        model_version=str(response.get("model_version") or request.get("model_version") or ""),
        kind=kind,
        messages=messages,
        answer=str(first.get("text", "")),
        finish_reason=str(first.get("finish_reason", "")),
        retrieved_chunk_ids=tuple(str(c) for c in answered.get("retrieved_chunk_ids", [])),
        rated_at_ns=envelope.occurred_at.ToNanoseconds(),
        answered_at_ns=_ns(response.get("occurred_at")),
        event_id=envelope.event_id,
        prompt=prompt,
    )


def _prompt(
    request_id: str, records: Sequence[Mapping[str, Any]], *, sourced: bool
) -> tuple[Message, ...]:
    """The augmented prompt of the routing record; () when the router changed nothing, when
    its record predates prompts being recorded, or when a source in it is readable only by
    some of the tenant's groups (feedback and datasets are read tenant-wide, so such a
    prompt is not kept; the audit log keeps it for auditors)."""
    routing = next(
        (r for r in records if r.get("kind") == "routing" and r.get("event") is not None
         and r["event"].get("routing", {}).get("prompt")),
        None,
    )  # fmt: skip
    if routing is None:
        if sourced and not any(r.get("kind") == "routing" for r in records):
            raise NotYet(f"the audit log has no routing record of {request_id} yet")
        if sourced and any(r.get("kind") == "routing" and r.get("event") is None for r in records):
            raise JoinError(f"the content of {request_id} was purged from the audit log")
        return ()
    if routing["event"]["routing"].get("prompt_restricted"):
        return ()
    return tuple(
        Message(str(m.get("role", "")), str(m.get("content", "")))
        for m in routing["event"]["routing"]["prompt"]
    )


def _ns(moment: Any) -> int:
    """An audit record's ISO 8601 time as nanoseconds since the epoch (0 if absent)."""
    return iso_ns(moment) or 0


def _one(records: Sequence[Mapping[str, Any]], kind: str) -> Mapping[str, Any] | None:
    for record in records:
        if record.get("kind") == kind:
            return record
    return None


def messages_json(messages: Sequence[Message]) -> str:
    return json.dumps(
        [{"role": m.role, "content": m.content} for m in messages], ensure_ascii=False
    )


def messages_from_json(text: str) -> tuple[Message, ...]:
    return tuple(Message(m["role"], m["content"]) for m in json.loads(text))
