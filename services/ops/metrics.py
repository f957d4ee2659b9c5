"""The ops service's own metrics: the SLIs it computes and the alerts firing, so that
Prometheus, Grafana and ``meshllm`` read one surface (its ``/metrics``).

``meshllm.ops.sli`` is each indicator per operation and model over the last minute and
the last five minutes; ``meshllm.ops.alerts.firing`` is 1 per alert firing now;
``meshllm.ops.replicas`` the replica count of each Serve deployment as the ops loop knows
it, and ``meshllm.ops.backlog`` the requests the router has not finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from opentelemetry.metrics import CallbackOptions, Observation

from services.ops.alerts import Evaluator
from services.ops.sli import SliWindows
from shared.instruments import get_meter

if TYPE_CHECKING:
    from services.ops.service import OpsService

WINDOWS_S = (60.0, 300.0)
SHOWN = ("rate_per_s", "error_rate", "p50_s", "p99_s", "ttft_p50_s", "ttft_p99_s",
         "tokens_per_s", "concurrency")  # fmt: skip

_meter = get_meter("meshllm.ops")
answers = _meter.create_counter(
    "meshllm.ops.answers", unit="{answer}", description="Answers read from telemetry.spans"
)
rejected = _meter.create_counter(
    "meshllm.ops.records.rejected",
    unit="{record}",
    description="telemetry.spans records that were not OTLP (dead-lettered)",
)
transitions = _meter.create_counter(
    "meshllm.ops.alerts.transitions",
    unit="{alert}",
    description="Alerts that fired or resolved, by rule and state",
)

decisions = _meter.create_counter(
    "meshllm.ops.scaling.decisions",
    unit="{decision}",
    description="Replica changes decided, by deployment and reason",
)


class OpsMetrics:
    """Observes the latest windows and evaluator of this process."""

    _latest: OpsMetrics | None = None

    def __init__(
        self,
        windows: SliWindows,
        evaluator: Evaluator,
        clock: Callable[[], float] = time.time,
        scaling: OpsService | None = None,
    ) -> None:
        self.windows = windows
        self.evaluator = evaluator
        self.clock = clock
        self.scaling = scaling
        OpsMetrics._latest = self

    @staticmethod
    def _observe_replicas(options: CallbackOptions) -> Iterator[Observation]:
        latest = OpsMetrics._latest
        if latest is None or latest.scaling is None:
            return
        for deployment, count in list(latest.scaling.replicas.items()):
            yield Observation(count, {"deployment": deployment})

    @staticmethod
    def _observe_backlog(options: CallbackOptions) -> Iterator[Observation]:
        latest = OpsMetrics._latest
        if latest is not None and latest.scaling is not None and latest.scaling.waiting is not None:
            yield Observation(latest.scaling.waiting)

    @staticmethod
    def _observations(groups: tuple[str, ...]) -> Iterator[Observation]:
        """The SLIs of every window, by ``groups``."""
        latest = OpsMetrics._latest
        if latest is None:
            return
        now = latest.clock()
        for window in WINDOWS_S:
            for labels, sli in latest.windows.slis(now, window, groups).items():
                for name in SHOWN:
                    value = sli.value(name)
                    if value is not None:
                        yield Observation(
                            value, {**dict(labels), "indicator": name, "window": f"{window:g}s"}
                        )

    @staticmethod
    def _observe_slis(options: CallbackOptions) -> Iterator[Observation]:
        yield from OpsMetrics._observations(("operation", "model"))

    @staticmethod
    def _observe_versions(options: CallbackOptions) -> Iterator[Observation]:
        yield from OpsMetrics._observations(("operation", "model", "model_version", "pool"))

    @staticmethod
    def _observe_firing(options: CallbackOptions) -> Iterator[Observation]:
        latest = OpsMetrics._latest
        if latest is None:
            return
        for rule, labels, _, _ in latest.evaluator.firing():
            yield Observation(1, {**dict(labels), "rule": rule.name, "severity": rule.severity})


_meter.create_observable_gauge(
    "meshllm.ops.sli",
    callbacks=[OpsMetrics._observe_slis],
    description="SLIs from the answers' spans, by indicator, window, operation and model",
)
_meter.create_observable_gauge(
    "meshllm.ops.sli.by_version",
    callbacks=[OpsMetrics._observe_versions],
    description="The same SLIs by operation, model, model version and pool (the answering "
    "replica's pool): what a release compares between two versions",
)
_meter.create_observable_gauge(
    "meshllm.ops.alerts.firing",
    callbacks=[OpsMetrics._observe_firing],
    unit="{alert}",
    description="1 per alert firing now, by rule, severity and its group's labels",
)
_meter.create_observable_gauge(
    "meshllm.ops.replicas",
    callbacks=[OpsMetrics._observe_replicas],
    unit="{replica}",
    description="Replicas of each Serve deployment, as reported by inference or last decided",
)
_meter.create_observable_gauge(
    "meshllm.ops.backlog",
    callbacks=[OpsMetrics._observe_backlog],
    unit="{request}",
    description="Requests on the request topics the router has not finished (its group's lag)",
)
