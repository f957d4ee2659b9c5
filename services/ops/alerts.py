"""Alert rules over the SLIs, with a ``for`` duration and hysteresis. No I/O.

A rule fires for a group (its ``by`` labels, e.g. one model) once its indicator has been
past ``threshold`` for ``for_s``, and resolves once it has been back past ``clear`` (a
bound on the safe side of the threshold) for ``clear_for_s``: a P99 that hovers around
500 ms fires once, not every minute. A group with fewer than ``min_requests`` answers in
the window (streamed ones, for first-token times) has no value (too few to say), and a
firing alert whose group has no value clears like one back in bounds. Rules come from one
YAML file (``rules.yaml`` beside this module by default); a bad rule is refused at
start-up, naming the rule and the field.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from services.ops.readings import READINGS
from services.ops.sli import DIMENSIONS, INDICATORS, Labels

DEFAULT_RULES = Path(__file__).with_name("rules.yaml")


class RulesError(ValueError):
    """The rules file cannot be used; the message names the rule and the field."""


class Rule(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
    indicator: str
    above: bool = Field(True, description="Fire when the indicator is above the threshold.")
    threshold: float
    clear: float = Field(description="Resolve once back past this bound (hysteresis).")
    for_s: float = Field(ge=0)
    clear_for_s: float = Field(ge=0)
    window_s: float = Field(gt=0)
    by: tuple[str, ...] = ()
    min_requests: int = Field(1, ge=1)
    severity: Literal["page", "ticket", "info"] = "page"
    summary: str

    @field_validator("indicator")
    @classmethod
    def _known_indicator(cls, value: str) -> str:
        if value not in INDICATORS | READINGS:
            known = sorted(INDICATORS | READINGS)
            raise ValueError(f"unknown indicator {value!r}; one of {known}")
        return value

    @field_validator("by")
    @classmethod
    def _known_labels(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if unknown := set(value) - set(DIMENSIONS):
            raise ValueError(f"unknown label(s) {sorted(unknown)}; labels are {DIMENSIONS}")
        return value

    @model_validator(mode="after")
    def _readings_have_no_groups(self) -> Rule:
        if self.indicator in READINGS and self.by:
            raise ValueError(f"{self.indicator} is one reading of the mesh: it has no 'by' labels")
        return self

    @model_validator(mode="after")
    def _clear_on_the_safe_side(self) -> Rule:
        safe = self.clear <= self.threshold if self.above else self.clear >= self.threshold
        if not safe:
            side = "at or below" if self.above else "at or above"
            raise ValueError(f"clear ({self.clear}) must be {side} threshold ({self.threshold})")
        return self

    def breached(self, value: float) -> bool:
        return value > self.threshold if self.above else value < self.threshold

    def cleared(self, value: float) -> bool:
        return value <= self.clear if self.above else value >= self.clear


class _RulesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rules: list[Rule] = Field(min_length=1)


def load_rules(path: Path = DEFAULT_RULES) -> tuple[Rule, ...]:
    """The rules of ``path``.

    Raises:
        RulesError: unreadable YAML, an unknown field or indicator, a clear bound on the
            wrong side, or two rules with one name.
    """
    try:
        document = yaml.safe_load(path.read_text())
        rules = _RulesFile.model_validate(document).rules
    except (OSError, yaml.YAMLError) as error:
        raise RulesError(f"{path}: {error}") from None
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()
        )
        raise RulesError(f"{path}: {problems}") from None
    names = [rule.name for rule in rules]
    if duplicates := sorted({n for n in names if names.count(n) > 1}):
        raise RulesError(f"{path}: rule name(s) used twice: {duplicates}")
    return tuple(rules)


@dataclass(frozen=True)
class Transition:
    """An alert that started firing or resolved."""

    rule: Rule
    labels: Labels
    firing: bool
    value: float | None
    at_s: float
    since_s: float  # when its condition started (firing) or cleared (resolved)

    @property
    def alert_id(self) -> str:
        """Stable per rule and group: a firing and its resolution share it."""
        key = self.rule.name + "".join(f"|{k}={v}" for k, v in self.labels)
        return f"{self.rule.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


@dataclass
class _State:
    pending_since: float | None = None
    firing_since: float | None = None
    clearing_since: float | None = None
    value: float | None = None


class Measure(Protocol):
    """What a rule reads for one group: an SLI (:class:`~services.ops.sli.Sli`) or a
    reading (:class:`~services.ops.readings.Reading`)."""

    def count_for(self, indicator: str) -> int: ...

    def value(self, name: str) -> float | None: ...


SlisFor = Callable[[Rule], Mapping[Labels, Measure]]


class Evaluator:
    """Keeps each (rule, group)'s state between evaluations."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)
        self._states: dict[tuple[str, Labels], _State] = {}

    def firing(self) -> list[tuple[Rule, Labels, float | None, float]]:
        """(rule, labels, last value, firing since) of every alert firing now."""
        by_name = {rule.name: rule for rule in self.rules}
        return [
            (by_name[name], labels, state.value, state.firing_since)
            for (name, labels), state in sorted(self._states.items())
            if state.firing_since is not None
        ]

    def restore(
        self, rule_name: str, labels: Labels, firing_since: float, value: float | None
    ) -> bool:
        """An alert an earlier instance left firing (its last event on ``ops.alerts``):
        firing here since ``firing_since``, so it resolves once its condition clears and
        does not fire twice. False for a rule no longer loaded."""
        if rule_name not in {rule.name for rule in self.rules}:
            return False
        self._states[(rule_name, labels)] = _State(firing_since=firing_since, value=value)
        return True

    def evaluate(self, now_s: float, slis_for: SlisFor) -> list[Transition]:
        transitions: list[Transition] = []
        for rule in self.rules:
            slis = slis_for(rule)
            groups = set(slis) | {labels for name, labels in self._states if name == rule.name}
            for labels in sorted(groups):
                sli = slis.get(labels)
                value = None
                if sli is not None and sli.count_for(rule.indicator) >= rule.min_requests:
                    value = sli.value(rule.indicator)
                change = self._step(rule, labels, value, now_s)
                if change is not None:
                    transitions.append(change)
        return transitions

    def _step(
        self, rule: Rule, labels: Labels, value: float | None, now_s: float
    ) -> Transition | None:
        key = (rule.name, labels)
        state = self._states.setdefault(key, _State())
        state.value = value
        if state.firing_since is None:
            if value is None or not rule.breached(value):
                self._states.pop(key)  # nothing pending: forget the group
                return None
            if state.pending_since is None:
                state.pending_since = now_s
            if now_s - state.pending_since < rule.for_s:
                return None
            state.firing_since, state.clearing_since = now_s, None
            return Transition(rule, labels, True, value, now_s, state.pending_since)
        if value is not None and not rule.cleared(value):
            state.clearing_since = None
            return None
        if state.clearing_since is None:
            state.clearing_since = now_s
        if now_s - state.clearing_since < rule.clear_for_s:
            return None
        since = state.clearing_since
        self._states.pop(key)
        return Transition(rule, labels, False, value, now_s, since)
