"""The audit service's metrics: records stored, the log's size, and how much of it the
latest signed checkpoint does not cover yet, and for how long.

``meshllm.audit.uncovered`` above 0 for longer than a few checkpoint intervals means
records are stored but not yet sealed by a signature (the audit durability alert).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from opentelemetry.metrics import CallbackOptions, Observation

from shared.instruments import get_meter

_meter = get_meter("meshllm.audit")
_records = _meter.create_counter(
    "meshllm.audit.records",
    unit="{record}",
    description="Audit events taken in, by outcome (stored, duplicate, conflict)",
)


class AuditMetrics:
    """What the audit service knows of its log, kept on its event loop (a scrape never
    waits for the log's lock)."""

    _latest: AuditMetrics | None = None

    def __init__(self, size: int, covered: int, checkpoint_at: float | None) -> None:
        """``covered``: the latest checkpoint's tree size; ``checkpoint_at``: when it was
        signed (seconds since the epoch), None without one."""
        self.size = size
        self.covered = covered
        self.checkpoint_at = checkpoint_at
        AuditMetrics._latest = self

    def taken(self, outcome: str, leaf_index: int | None = None) -> None:
        _records.add(1, {"outcome": outcome})
        if leaf_index is not None:
            self.size = max(self.size, leaf_index + 1)

    def sealed(self, tree_size: int, signed_at: float) -> None:
        self.covered = max(self.covered, tree_size)
        self.checkpoint_at = signed_at

    @staticmethod
    def _observe(options: CallbackOptions) -> Iterator[Observation]:
        latest = AuditMetrics._latest
        if latest is None:
            return
        yield Observation(latest.size, {"measure": "size"})
        yield Observation(max(0, latest.size - latest.covered), {"measure": "uncovered"})

    @staticmethod
    def _observe_age(options: CallbackOptions) -> Iterator[Observation]:
        latest = AuditMetrics._latest
        if latest is not None and latest.checkpoint_at is not None:
            yield Observation(max(0.0, time.time() - latest.checkpoint_at))


_meter.create_observable_gauge(
    "meshllm.audit.log.records",
    callbacks=[AuditMetrics._observe],
    unit="{record}",
    description="Records in the log (measure=size) and not yet under a signed checkpoint "
    "(measure=uncovered)",
)
_meter.create_observable_gauge(
    "meshllm.audit.checkpoint.age",
    callbacks=[AuditMetrics._observe_age],
    unit="s",
    description="Seconds since the latest checkpoint was signed",
)
