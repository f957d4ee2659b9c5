"""The text an audit event carries, redacted by a tenant's ``audit`` policy.

Every service that publishes audit records with content (the gateway's request and
response records, the router's record of a retrieval-augmented prompt) redacts them here
before they leave the process, so the audit log never holds what the policy removes.
"""

from __future__ import annotations

from shared.events.v1 import events_pb2 as ev
from shared.pii.redact import Redactor


def redact_audit_event(event: ev.AuditEvent, redactor: Redactor) -> None:
    """Redact, in place, the prompts, inputs, answers and augmented prompts of ``event``."""
    if not redactor.policy.enabled:
        return
    record = event.WhichOneof("record")
    if record == "request":
        for message in event.request.messages:
            message.content = redactor.redact(message.content).text
        inputs = [redactor.redact(text).text for text in event.request.inputs]
        del event.request.inputs[:]
        event.request.inputs.extend(inputs)
    elif record == "response":
        for choice in event.response.choices:
            choice.text = redactor.redact(choice.text).text
    elif record == "routing":
        for message in event.routing.prompt:
            message.content = redactor.redact(message.content).text
