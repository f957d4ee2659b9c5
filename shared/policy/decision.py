"""The question asked of the access policy, its answer, and the evaluator interface."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol, get_args

from shared.logging import get_logger

log = get_logger("shared.policy")

Priority = Literal["high", "normal", "low"]
PRIORITIES: tuple[Priority, ...] = get_args(Priority)
ResourceKind = Literal[
    "model", "kb_collection", "audit", "feedback", "dataset", "training_job", "admin"
]
RESOURCE_KINDS: tuple[ResourceKind, ...] = get_args(ResourceKind)
DECISION_RULE = "data.meshllm.authz.decision"
PLATFORM_TENANT = "*"
"""The tenant of platform-wide resources (the policy set, the tenants themselves)."""


class PolicyError(Exception):
    """A policy or its data cannot be loaded, or the policy gives no well-formed decision;
    the message names the file, the setting or the server."""


@dataclass(frozen=True)
class Subject:
    """Who asks: an API key or a JWT's subject, of one tenant, holding roles."""

    id: str
    tenant: str
    roles: tuple[str, ...]


@dataclass(frozen=True)
class Resource:
    """What is acted on. ``tenant`` is the tenant that owns it (``PLATFORM_TENANT`` for
    platform-wide resources); ``name`` and ``version`` name a model, a collection, a job."""

    kind: ResourceKind
    tenant: str
    name: str | None = None
    version: str | None = None


@dataclass(frozen=True)
class AccessRequest:
    """May ``subject`` do ``action`` on ``resource``?

    Attributes:
        subject: who asks.
        action: e.g. ``chat`` on a model, ``read`` on audit records (see policies/authz.rego).
        resource: what is acted on.
        priority: the priority asked for (model actions); None: the policy picks.
        max_tokens: the tokens asked for (generating actions); None: the policy's limit.
        source_ip: the caller's address, for roles or tenants restricted to networks; an
            address that does not parse counts as unknown.
        at: when the request is made, for roles or tenants restricted to hours (a naive
            time is UTC); None: the evaluator's clock.
    """

    subject: Subject
    action: str
    resource: Resource
    priority: str | None = None
    max_tokens: int | None = None
    source_ip: str | None = None
    at: datetime | None = None

    def to_input(self) -> dict[str, Any]:
        """The input document of the policy (its schema is in policies/authz.rego)."""
        return {
            "subject": {
                "id": self.subject.id,
                "tenant": self.subject.tenant,
                "roles": list(self.subject.roles),
            },
            "action": self.action,
            "resource": {
                "kind": self.resource.kind,
                "tenant": self.resource.tenant,
                "name": self.resource.name,
                "version": self.resource.version,
            },
            "request": {"priority": self.priority, "max_tokens": self.max_tokens},
            "context": {"source_ip": _address(self.source_ip), "time_ns": _time_ns(self.at)},
        }


@dataclass(frozen=True)
class Decision:
    """The policy's answer.

    Attributes:
        allow: whether the request may proceed.
        reasons: one sentence each, fit to show the caller: why it was denied, or which
            roles granted it.
        max_tokens: the max_tokens to run a generating request with: the requested one, or
            the caller's limit when none was asked; None for actions that generate nothing.
        priority: the priority to run a model request at: the requested one, else
            ``normal`` when allowed, else the best one allowed; ``normal`` for other actions.
        granted_by: the held roles that granted the request; empty when denied.
    """

    allow: bool
    reasons: tuple[str, ...]
    max_tokens: int | None
    priority: Priority
    granted_by: tuple[str, ...] = ()


FAILED = Decision(
    allow=False, reasons=("policy evaluation failed",), max_tokens=None, priority="normal"
)
"""The answer when the policy could not be evaluated: a denial."""

PROBE = AccessRequest(
    subject=Subject(id="probe", tenant="probe", roles=()),
    action="list",
    resource=Resource(kind="model", tenant="probe"),
)
"""A request every well-formed policy answers (with a denial); asked when one is loaded."""


class PolicyEvaluator(Protocol):
    """Evaluates the access policy; the embedded one and the OPA server one are alike."""

    def decide(self, request: AccessRequest) -> Decision:
        """The decision on ``request``. Never raises: a failure is a denial (``FAILED``)."""
        ...

    async def adecide(self, request: AccessRequest) -> Decision:
        """:meth:`decide` for an event loop: never blocks it on I/O. Never raises."""
        ...

    def close(self) -> None:
        """Release connections; later decisions may fail (and so deny)."""
        ...

    async def aclose(self) -> None:
        """:meth:`close`, also releasing what :meth:`adecide` opened in the running loop."""
        ...


def evaluation_failed(
    evaluator: str, rule: str, request: AccessRequest, error: Exception
) -> Decision:
    """Log why ``request`` could not be decided and deny it (fail closed)."""
    log.error(
        "policy evaluation failed",
        evaluator=evaluator,
        error=str(error).split("Stack backtrace:", 1)[0].strip() or type(error).__name__,
        rule=rule,
        action=request.action,
        resource=request.resource.kind,
        tenant=request.subject.tenant,
        subject=request.subject.id,
    )
    return FAILED


def parse_decision(result: Any) -> Decision:
    """The :class:`Decision` in the policy's result.

    Raises:
        PolicyError: the result is undefined or not a well-formed decision.
    """
    if result is None:
        raise PolicyError("the rule is undefined")
    if not isinstance(result, dict):
        raise PolicyError(f"the decision is {type(result).__name__}, not an object")
    allow = result.get("allow")
    reasons = _strings("reasons", result.get("reasons", []))
    granted_by = _strings("granted_by", result.get("granted_by", []))
    max_tokens = result.get("max_tokens")
    priority = result.get("priority", "normal")
    if not isinstance(allow, bool):
        raise PolicyError(f"allow is {allow!r}, not a boolean")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)):
        raise PolicyError(f"max_tokens is {max_tokens!r}, not an integer or null")
    if priority not in PRIORITIES:
        raise PolicyError(f"priority is {priority!r}, not one of {', '.join(PRIORITIES)}")
    return Decision(
        allow=allow,
        reasons=reasons,
        max_tokens=max_tokens,
        priority=priority,
        granted_by=granted_by if allow else (),
    )


def _strings(field: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple | set | frozenset) or not all(
        isinstance(item, str) for item in value
    ):
        raise PolicyError(f"{field} is {value!r}, not a list of strings")
    # a Rego set comes back as a Python set from regorus and as a sorted array from OPA
    return tuple(sorted(value) if isinstance(value, set | frozenset) else value)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _address(source_ip: str | None) -> str | None:
    if source_ip is None:
        return None
    try:
        address = ipaddress.ip_address(source_ip)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


def _time_ns(at: datetime | None) -> int | None:
    if at is None:
        return None
    moment = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(microseconds=1) * 1_000
