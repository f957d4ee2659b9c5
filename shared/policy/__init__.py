"""Access decisions: may this subject do this action on this resource of this tenant?

The question is an :class:`AccessRequest`, the answer a :class:`Decision`; the policy is
the Rego of ``policies/`` (its input schema, roles and rules are described in
``policies/authz.rego``). Two evaluators answer alike, behind :class:`PolicyEvaluator`:

- :class:`EmbeddedEvaluator`: regorus, in process (``MESHLLM_POLICY__ENGINE=embedded``);
- :class:`~shared.policy.opa.OpaServerEvaluator`: an OPA server over its REST API, loaded
  with the same files (``MESHLLM_POLICY__ENGINE=opa``, ``MESHLLM_POLICY__OPA_URL``).

Neither raises on a decision: a failure to evaluate is a denial with a reason.

Example, the audit query API asking whether a caller may read tenant T's records::

    evaluator = load_evaluator(settings.policy, settings.policy_dir)
    decision = evaluator.decide(
        AccessRequest(Subject(principal.subject, principal.tenant, principal.roles),
                      "read", Resource("audit", tenant="T"))
    )
"""

from __future__ import annotations

from pathlib import Path

from shared.policy.decision import (
    DECISION_RULE,
    FAILED,
    PLATFORM_TENANT,
    PRIORITIES,
    RESOURCE_KINDS,
    AccessRequest,
    Decision,
    PolicyError,
    PolicyEvaluator,
    Priority,
    Resource,
    ResourceKind,
    Subject,
    parse_decision,
)
from shared.policy.embedded import EmbeddedEvaluator
from shared.policy.files import PolicyBundle, PolicySource
from shared.policy.settings import PolicyEngine, PolicySettings

__all__ = [
    "DECISION_RULE",
    "FAILED",
    "PLATFORM_TENANT",
    "PRIORITIES",
    "RESOURCE_KINDS",
    "AccessRequest",
    "Decision",
    "EmbeddedEvaluator",
    "PolicyBundle",
    "PolicyEngine",
    "PolicyError",
    "PolicyEvaluator",
    "PolicySettings",
    "PolicySource",
    "Priority",
    "Resource",
    "ResourceKind",
    "Subject",
    "load_evaluator",
    "parse_decision",
]


def load_evaluator(settings: PolicySettings, directory: Path) -> PolicyEvaluator:
    """The evaluator ``settings`` choose, loaded with the policy files of ``directory``.

    Raises:
        PolicyError: the files, the data or the OPA server are unusable (the message names
            the file, the data field or the server).
    """
    bundle = PolicyBundle.from_dir(directory)
    if settings.engine is PolicyEngine.EMBEDDED:
        return EmbeddedEvaluator(bundle)
    from shared.policy.opa import OpaServerEvaluator

    if settings.opa_url is None:
        raise PolicyError("MESHLLM_POLICY__OPA_URL must be set when the engine is opa")
    token = settings.opa_token.get_secret_value() if settings.opa_token else None
    return OpaServerEvaluator(
        settings.opa_url,
        bundle,
        token=token,
        timeout_s=settings.opa_timeout_s,
        push=settings.opa_push,
    )
