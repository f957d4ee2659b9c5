"""Which waiting request runs next: priority first, with aging so low priority never starves."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from shared.bus import Waiting
from shared.topics import REQUESTS_HIGH, REQUESTS_LOW, REQUESTS_NORMAL

RANK = {REQUESTS_HIGH.name: 2, REQUESTS_NORMAL.name: 1, REQUESTS_LOW.name: 0}


def priority_with_aging(aging_s: float) -> Callable[[Sequence[Waiting]], Waiting]:
    """A chooser: the highest ``rank + waited / aging_s``; ties go to the older request.

    With ``aging_s`` = 2, a low-priority request that has waited 4 s ranks with a
    high-priority one that has just arrived, so a steady stream of high-priority work
    delays lower priorities by at most ``aging_s`` per level, never forever.
    """

    def score(waiting: Waiting) -> tuple[float, float]:
        return (RANK.get(waiting.topic, 0) + waiting.waited_s / aging_s, waiting.waited_s)

    def choose(candidates: Sequence[Waiting]) -> Waiting:
        return max(candidates, key=score)

    return choose
