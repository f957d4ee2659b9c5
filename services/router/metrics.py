"""The router's metrics: waiting requests per priority, requests in flight per pool,
replica retries, time spent waiting in Kafka, and requests done by pool and outcome.

The queue is what the mesh sees before an engine does: records fetched but not started
(``meshllm.router.queue.depth``) and, per topic, records not yet fetched
(``meshllm.bus.consumer.lag``, from :mod:`shared.bus.metrics`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from opentelemetry.metrics import CallbackOptions, Observation

from shared.instruments import get_meter
from shared.metrics import histogram

_meter = get_meter("meshllm.router")
_retries = _meter.create_counter(
    "meshllm.router.retries",
    unit="{attempt}",
    description="Attempts that failed on a replica and went to another, by pool",
)
_queue_wait = histogram(
    _meter,
    "meshllm.router.queue.wait",
    unit="s",
    description="From the gateway's publish to the router starting the request, by priority",
)
_release_arms = _meter.create_counter(
    "meshllm.router.release.requests",
    unit="{request}",
    description="Requests of a model under release, by the arm the split sent them to",
)
_done = _meter.create_counter(
    "meshllm.router.requests",
    unit="{request}",
    description="Requests finished, by pool, priority and error code (none: answered)",
)


class RouterMetrics:
    """Reads the router's state when scraped; counts its events as they happen.

    The gauges report the router made last in this process (a service has one).
    """

    _latest: RouterMetrics | None = None

    def __init__(
        self,
        buffered: Callable[[], Mapping[str, int]],
        in_flight: Callable[[], Mapping[str, int]],
    ) -> None:
        """``buffered``: {priority: requests fetched, not started}; ``in_flight``: {pool:
        requests on its replicas}."""
        self._buffered = buffered
        self._in_flight = in_flight
        RouterMetrics._latest = self

    @staticmethod
    def _observe_queue(options: CallbackOptions) -> Iterator[Observation]:
        if (latest := RouterMetrics._latest) is not None:
            for priority, depth in latest._buffered().items():
                yield Observation(depth, {"priority": priority})

    @staticmethod
    def _observe_in_flight(options: CallbackOptions) -> Iterator[Observation]:
        if (latest := RouterMetrics._latest) is not None:
            for pool, running in latest._in_flight().items():
                yield Observation(running, {"pool": pool})

    @staticmethod
    def retried(pool: str) -> None:
        _retries.add(1, {"pool": pool})

    @staticmethod
    def started(priority: str, waited_s: float) -> None:
        _queue_wait.record(waited_s, {"priority": priority})

    @staticmethod
    def released(model: str, arm: str) -> None:
        _release_arms.add(1, {"gen_ai.request.model": model[:64], "arm": arm})

    @staticmethod
    def finished(pool: str | None, priority: str, error_code: str | None) -> None:
        attributes = {"pool": pool or "none", "priority": priority}
        if error_code:
            attributes["error.type"] = error_code[:64]
        _done.add(1, attributes)


_meter.create_observable_gauge(
    "meshllm.router.queue.depth",
    callbacks=[RouterMetrics._observe_queue],
    unit="{request}",
    description="Requests fetched from Kafka and not started yet, by priority",
)
_meter.create_observable_gauge(
    "meshllm.router.in_flight",
    callbacks=[RouterMetrics._observe_in_flight],
    unit="{request}",
    description="Requests running on a pool's replicas",
)
