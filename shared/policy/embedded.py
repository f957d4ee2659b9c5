"""The access policy evaluated in process by regorus."""

from __future__ import annotations

import threading
from typing import Any

import regorus  # type: ignore[import-untyped]

from shared.policy.decision import (
    DECISION_RULE,
    PROBE,
    AccessRequest,
    Decision,
    PolicyError,
    evaluation_failed,
    parse_decision,
)
from shared.policy.files import PolicyBundle


def engine_message(error: Exception) -> str:
    """The cause in a regorus error, without the Rust backtrace it carries when
    ``RUST_BACKTRACE`` is set."""
    return str(error).split("Stack backtrace:", 1)[0].strip()


class EmbeddedEvaluator:
    """The policy evaluated in process by regorus; the decision is the object of ``rule``.

    A regorus engine keeps its input between calls and is bound to the thread that made
    it (using it from another thread panics), so each thread evaluates on an engine of its
    own, made from the policy text on its first decision (parsing the repository's policy
    takes about a millisecond). In the event loop's thread that is one engine, and decisions
    need no lock. Thread-safe. Keep the evaluator while the threads that used it run: one
    dropped before them frees their engines from the wrong thread, which regorus refuses
    (an "unsendable" warning, and the engine leaks).

    Args:
        bundle: the modules and data to load.
        rule: the rule that holds the decision.

    Raises:
        PolicyError: a module is not valid Rego or the data cannot be loaded (naming the
            file), or the policy gives no well-formed decision for a probe request.
    """

    def __init__(self, bundle: PolicyBundle, rule: str = DECISION_RULE) -> None:
        self.bundle = bundle
        self.rule = rule
        self._data_json = bundle.data_json
        self._local = threading.local()
        self._local.engine = self._engine()
        try:
            parse_decision(self._evaluate(PROBE.to_input()))
        except (RuntimeError, PolicyError) as error:
            names = ", ".join(str(file) for file in bundle.files)
            raise PolicyError(
                f"policy {names}: {rule} does not give a decision: {engine_message(error)}"
            ) from None

    def decide(self, request: AccessRequest) -> Decision:
        """The decision on ``request``; an evaluation error denies it (fail closed)."""
        try:
            return parse_decision(self._evaluate(request.to_input()))
        except Exception as error:  # fail closed, whatever went wrong
            return evaluation_failed("embedded", self.rule, request, error)

    async def adecide(self, request: AccessRequest) -> Decision:
        """:meth:`decide`: in process and about 11 µs, so it runs on the loop itself."""
        return self.decide(request)

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to release: the engines go with their threads."""

    def _engine(self) -> Any:
        engine = regorus.Engine()
        for source in self.bundle.sources:
            try:
                engine.add_policy(str(source.path), source.text)
            except RuntimeError as error:
                raise PolicyError(f"policy file {source.path}: {engine_message(error)}") from None
        if self._data_json is not None:
            try:
                engine.add_data_json(self._data_json)
            except RuntimeError as error:
                raise PolicyError(f"policy data: {engine_message(error)}") from None
        return engine

    def _evaluate(self, document: dict[str, Any]) -> Any:
        engine = getattr(self._local, "engine", None)
        if engine is None:
            engine = self._local.engine = self._engine()
        engine.set_input(document)
        return engine.eval_rule(self.rule)
