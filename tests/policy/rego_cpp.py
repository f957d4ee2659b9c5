"""The access policy on rego-cpp (regopy), a Rego implementation independent of regorus.

Both production evaluators run regorus (the OPA server path is tested against a double that
evaluates with regorus too), so the cell matrix also runs here: two engines written apart
agreeing on every cell is evidence that the policy means what the table says, not what one
interpreter happens to do.
"""

from __future__ import annotations

import json
from typing import Any

from shared.policy import AccessRequest, Decision, PolicyBundle
from shared.policy.decision import DECISION_RULE, parse_decision


class RegoCppEvaluator:
    """:class:`~shared.policy.PolicyEvaluator` on regopy, the bundle compiled once."""

    def __init__(self, bundle: PolicyBundle) -> None:
        import regopy  # type: ignore[import-untyped]

        self._regopy = regopy
        builder = regopy.Interpreter()
        for source in bundle.sources:
            builder.add_module(source.path.stem, source.text)
        builder.add_data_json(bundle.data_json)
        self._entrypoint = DECISION_RULE.removeprefix("data.").replace(".", "/")
        self._bundle = builder.build(None, [self._entrypoint])
        self._interpreter = regopy.Interpreter()

    def decide(self, request: AccessRequest) -> Decision:
        self._interpreter.set_input(self._regopy.Input(request.to_input()))
        output = self._interpreter.query_bundle_entrypoint(self._bundle, self._entrypoint)
        return parse_decision(_expression(str(output)))

    async def adecide(self, request: AccessRequest) -> Decision:
        return self.decide(request)

    def close(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


def _expression(output: str) -> Any:
    """The first expression of regopy's output text.

    rego-cpp 1.5 quotes the strings of an array that ``concat`` joins, which makes its JSON
    invalid for one kind of reason (a priority above the role's; ``policy.md`` of the policy
    benchmark); that fails here loudly rather than being mended.
    """
    return json.loads(output)["expressions"][0]
