"""What each role may do, written from the roles' descriptions, not from policies/.

The matrix tests compare every evaluator's decisions with this table. Change a role's
rights in policies/data.json and this table must change too: that is the point.
"""

from __future__ import annotations

from dataclasses import dataclass

# Every action of every resource kind.
KIND_ACTIONS: dict[str, frozenset[str]] = {
    "model": frozenset({"chat", "complete", "embed", "list"}),
    "kb_collection": frozenset({"read", "write", "admin"}),
    "audit": frozenset({"read", "verify"}),
    "feedback": frozenset({"submit", "read", "erase"}),
    "dataset": frozenset({"build", "read"}),
    "training_job": frozenset({"create", "read", "cancel", "promote"}),
    "admin": frozenset({"manage_keys", "deploy", "manage_policies", "manage_tenants"}),
}
EVERYTHING = KIND_ACTIONS
INFERENCE = frozenset({"chat", "complete", "embed", "list"})
GENERATING = frozenset({"chat", "complete"})

# role -> resource kind -> the actions it may do there (within its own tenant)
ROLE_ACTIONS: dict[str, dict[str, frozenset[str]]] = {
    # everything, in every tenant and on platform-wide resources
    "platform-admin": EVERYTHING,
    # everything, in its own tenant
    "admin": EVERYTHING,
    # builds on the platform: inference, writes knowledge bases, builds datasets from
    # feedback, trains models (not promote); erasing a request's content is an admin's
    "developer": {
        "model": INFERENCE,
        "kb_collection": frozenset({"read", "write"}),
        "feedback": frozenset({"submit", "read"}),
        "dataset": frozenset({"build", "read"}),
        "training_job": frozenset({"create", "read", "cancel"}),
    },
    # uses the assistant: inference, reads knowledge bases, gives and reads feedback
    "analyst": {
        "model": INFERENCE,
        "kb_collection": frozenset({"read"}),
        "feedback": frozenset({"submit", "read"}),
    },
    # reads and verifies the audit trail, nothing else (no inference)
    "auditor": {"audit": frozenset({"read", "verify"})},
    # an application: inference at low priority, sends feedback
    "service": {"model": INFERENCE, "feedback": frozenset({"submit"})},
}

# the first roles' names, kept for existing keys
ALIASES = {"user": "analyst", "batch": "service"}

CROSS_TENANT = frozenset({"platform-admin"})

# which models a role may use: None is any model, else name prefixes
MODEL_PREFIXES: dict[str, tuple[str, ...] | None] = {
    "platform-admin": None,
    "admin": None,
    "developer": None,
    "analyst": ("smollm2-",),
    "service": None,
}

TOKEN_LIMITS = {
    "platform-admin": 8192,
    "admin": 4096,
    "developer": 2048,
    "analyst": 1024,
    "service": 2048,
}

PRIORITIES = {
    "platform-admin": ("high", "normal", "low"),
    "admin": ("high", "normal", "low"),
    "developer": ("normal", "low"),
    "analyst": ("normal", "low"),
    "service": ("low",),
}


def canonical(role: str) -> str | None:
    """The role ``role`` names, None for an unknown one."""
    role = ALIASES.get(role, role)
    return role if role in ROLE_ACTIONS else None


@dataclass(frozen=True)
class Expected:
    allow: bool
    reason: str
    """A fragment of one of the reasons."""
    max_tokens: int | None = None
    priority: str = "normal"


def denial(
    role: str,
    kind: str,
    action: str,
    *,
    subject_tenant: str,
    resource_tenant: str,
    model: str | None,
) -> str | None:
    """A fragment of the reason ``role`` may not do this, None when it may."""
    name = canonical(role)
    if name is None:
        return f"unknown role {role}"
    if action not in KIND_ACTIONS[kind]:
        return f"unknown action {action} on {kind}"
    if action not in ROLE_ACTIONS[name].get(kind, frozenset()):
        return f"action {action} on {kind} is not allowed for role {role}"
    crosses = resource_tenant != subject_tenant or resource_tenant == "*"
    if crosses and name not in CROSS_TENANT:
        return f"tenant {subject_tenant} may not act on"
    prefixes = MODEL_PREFIXES.get(name)
    if kind == "model" and model and prefixes and not model.startswith(prefixes):
        return f"model {model} is not allowed for role {role}"
    return None


def expected(
    role: str,
    kind: str,
    action: str,
    *,
    subject_tenant: str,
    resource_tenant: str,
    model: str | None = None,
) -> Expected:
    """The decision on one role doing ``action`` on a resource, with nothing requested."""
    reason = denial(
        role,
        kind,
        action,
        subject_tenant=subject_tenant,
        resource_tenant=resource_tenant,
        model=model,
    )
    if reason is not None:
        return Expected(False, reason)
    name = canonical(role)
    assert name is not None
    scope = "across tenants" if resource_tenant != subject_tenant else f"in tenant {subject_tenant}"
    alias = f" (alias of {name})" if role != name else ""
    granted = f"granted by role {role}{alias} {scope}"
    if kind != "model":
        return Expected(True, granted)
    priorities = PRIORITIES[name]
    priority = "normal" if "normal" in priorities else priorities[0]
    limit = TOKEN_LIMITS[name] if action in GENERATING else None
    return Expected(True, granted, limit, priority)
