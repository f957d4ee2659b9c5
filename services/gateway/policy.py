"""What a caller may do at the gateway: the platform's access policy asked for each request.

The gateway's questions are about models: may this principal chat with, complete on,
embed with or list a model, at which priority, with how many tokens. They are asked of
the policy in ``policies/`` through :mod:`shared.policy`, evaluated in process by regorus
or by an OPA server (``MESHLLM_POLICY__ENGINE``), both behind the same :class:`Policy`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

from services.gateway.auth import Principal
from services.gateway.settings import GatewaySettings
from shared.policy import (
    DECISION_RULE,
    FAILED,
    PRIORITIES,
    AccessRequest,
    Decision,
    EmbeddedEvaluator,
    PolicyBundle,
    PolicyError,
    PolicyEvaluator,
    Priority,
    Resource,
    Subject,
    load_evaluator,
)
from shared.policy.decision import evaluation_failed
from shared.policy.files import DATA_FILE, read_data

__all__ = [
    "ACTIONS",
    "DATA_FILE",
    "DECISION_RULE",
    "MODEL_ACTIONS",
    "PRIORITIES",
    "Action",
    "Decision",
    "GatewayPolicy",
    "Policy",
    "PolicyError",
    "PolicyRequest",
    "Priority",
    "RegoPolicy",
    "build_policy",
]

Action = Literal["chat.completions", "completions", "embeddings", "models.list"]
ACTIONS: tuple[Action, ...] = get_args(Action)
MODEL_ACTIONS: Mapping[Action, str] = {
    "chat.completions": "chat",
    "completions": "complete",
    "embeddings": "embed",
    "models.list": "list",
}
"""The policy's action on a model for each of the gateway's routes."""


@dataclass(frozen=True)
class PolicyRequest:
    """The question asked of the policy: may ``principal`` do ``action`` on ``model``?

    The model belongs to the principal's tenant (the gateway serves a tenant's callers the
    models of their tenant). ``source_ip`` is needed where a role or tenant is restricted
    to networks.
    """

    principal: Principal
    action: Action
    model: str | None = None
    requested_priority: str | None = None
    max_tokens: int | None = None
    model_version: str | None = None
    source_ip: str | None = None

    def to_access_request(self) -> AccessRequest:
        """The request in the policy's terms: an action on a model resource."""
        principal = self.principal
        return AccessRequest(
            subject=Subject(principal.subject, principal.tenant, principal.roles),
            action=MODEL_ACTIONS[self.action],
            resource=Resource("model", principal.tenant, self.model, self.model_version),
            priority=self.requested_priority,
            max_tokens=self.max_tokens,
            source_ip=self.source_ip,
        )

    def to_input(self) -> dict[str, Any]:
        """The policy's input document (the schema is in ``policies/authz.rego``)."""
        return self.to_access_request().to_input()


class Policy(Protocol):
    """What the gateway asks of its policy. The ``a``-methods are for the event loop: they
    never block it on I/O (the OPA server's answer is awaited, not waited for)."""

    def decide(self, request: PolicyRequest) -> Decision:
        """Decide ``request``; never raises: a failure is a denial."""
        ...

    def authorize(self, access: AccessRequest) -> Decision:
        """Decide any action on any resource (audit records, collections...); never raises."""
        ...

    async def adecide(self, request: PolicyRequest) -> Decision:
        """:meth:`decide` without blocking the event loop."""
        ...

    async def aauthorize(self, access: AccessRequest) -> Decision:
        """:meth:`authorize` without blocking the event loop."""
        ...


class GatewayPolicy:
    """The gateway's :class:`Policy` over either evaluator of :mod:`shared.policy`."""

    def __init__(self, evaluator: PolicyEvaluator) -> None:
        self.evaluator = evaluator

    def decide(self, request: PolicyRequest) -> Decision:
        """The decision on ``request``; a failure denies it (fail closed)."""
        access = _access(request)
        return FAILED if access is None else self.authorize(access)

    def authorize(self, access: AccessRequest) -> Decision:
        """The decision on ``access``; a failure denies it (fail closed)."""
        try:
            return self.evaluator.decide(access)
        except Exception as error:  # an evaluator breaking its promise still denies
            return evaluation_failed(type(self.evaluator).__name__, DECISION_RULE, access, error)

    async def adecide(self, request: PolicyRequest) -> Decision:
        """:meth:`decide` for the event loop; a failure denies it (fail closed)."""
        access = _access(request)
        return FAILED if access is None else await self.aauthorize(access)

    async def aauthorize(self, access: AccessRequest) -> Decision:
        """:meth:`authorize` for the event loop; a failure denies it (fail closed)."""
        try:
            return await self.evaluator.adecide(access)
        except Exception as error:  # an evaluator breaking its promise still denies
            return evaluation_failed(type(self.evaluator).__name__, DECISION_RULE, access, error)

    def close(self) -> None:
        self.evaluator.close()

    async def aclose(self) -> None:
        await self.evaluator.aclose()


def _access(request: PolicyRequest) -> AccessRequest | None:
    try:
        return request.to_access_request()
    except Exception:  # an action the mapping lacks: deny, never raise
        return None


class RegoPolicy(GatewayPolicy):
    """The policy evaluated in process by regorus (:class:`~shared.policy.EmbeddedEvaluator`).

    Args:
        paths: ``.rego`` files, or directories whose ``*.rego`` files (not ``*_test.rego``)
            are loaded.
        data: the data document (``data``), e.g. the roles table.
        rule: the rule that holds the decision.

    Raises:
        PolicyError: a file is missing, unreadable or not valid Rego, no policy was
            given, the data breaks its rules, or the policy does not yield a well-formed
            decision for a probe request.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        data: Mapping[str, Any] | None = None,
        rule: str = DECISION_RULE,
    ) -> None:
        super().__init__(EmbeddedEvaluator(PolicyBundle.load(paths, data), rule))

    @classmethod
    def from_dir(cls, directory: Path) -> RegoPolicy:
        """The ``*.rego`` files of ``directory`` with its ``data.json`` (if any) as data.

        Raises:
            PolicyError: as :class:`RegoPolicy`, or ``data.json`` is not a JSON object.
        """
        directory = Path(directory)
        return cls([directory], read_data(directory / DATA_FILE))


def build_policy(settings: GatewaySettings) -> GatewayPolicy:
    """The policy of ``settings.policy_dir`` on the evaluator ``settings.policy`` chooses.

    Raises:
        PolicyError: the files, the data or the OPA server are unusable.
    """
    return GatewayPolicy(load_evaluator(settings.policy, settings.policy_dir))
