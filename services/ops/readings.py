"""Readings of the mesh that are not answers: queues, dead letters, audit durability. No I/O.

The ops service samples them every evaluation (:mod:`shared.bus.lag` asks the broker) and
alert rules use them like SLIs (``rules.yaml``):

- ``backlog``: requests on the request topics the router has not finished;
- ``audit_backlog``: audit events not yet durable in the audit store (its handler returns,
  and its offset is committed, only once the record is written and synced);
- ``dead_letters``: records added to the dead-letter topics within the rule's window.

A reading the last round could not take (the broker did not answer) has no value: its
rules do not fire on it, and one already firing resolves after its ``clear_for_s`` like
one back in bounds (:mod:`services.ops.alerts`; its ``OpsAlert`` then carries no value).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

READINGS = frozenset({"backlog", "audit_backlog", "dead_letters"})
COUNTED = 1 << 30  # a reading is not a sample of answers: min_requests does not apply


@dataclass(frozen=True)
class Reading:
    """One reading as the alert evaluator reads an SLI."""

    name: str
    measured: float | None

    def count_for(self, indicator: str) -> int:
        return COUNTED

    def value(self, name: str) -> float | None:
        return self.measured


class Readings:
    """The latest samples, and the dead-letter totals of the last ``keep_s``."""

    def __init__(self, keep_s: float = 900.0) -> None:
        self.keep_s = keep_s
        self.latest: dict[str, float | None] = {"backlog": None, "audit_backlog": None}
        self._dead_known = False  # whether the last round took the total
        self._dead: collections.deque[tuple[float, float]] = collections.deque()

    def sample(self, at_s: float, values: dict[str, float | None]) -> None:
        """One round's samples (None: not taken); ``dead_letters_total`` is a running total."""
        for name in ("backlog", "audit_backlog"):
            self.latest[name] = values.get(name)
        total = values.get("dead_letters_total")
        self._dead_known = total is not None
        if total is None:
            return
        self._dead.append((at_s, total))
        while self._dead and self._dead[0][0] < at_s - self.keep_s:
            self._dead.popleft()

    def reading(self, name: str, now_s: float, window_s: float) -> Reading:
        if name == "dead_letters":
            return Reading(name, self._increase(now_s, window_s))
        return Reading(name, self.latest.get(name))

    def _increase(self, now_s: float, window_s: float) -> float | None:
        if not self._dead or not self._dead_known:
            return None
        newest = self._dead[-1][1]
        # the last total at or before the window's start (else the oldest kept)
        base = self._dead[0][1]
        for at_s, total in self._dead:
            if at_s > now_s - window_s:
                break
            base = total
        return max(0.0, newest - base)
