"""The mesh's metric instruments: OpenTelemetry's instrument API at a fraction of its cost.

Services create instruments as OpenTelemetry has them (``get_meter(...).create_counter``,
``create_histogram``, ``create_observable_gauge``, ``create_observable_counter``) and record
with ``add(value, attributes)`` / ``record(value, attributes)``. The OpenTelemetry SDK
spends 25-35 us on each such call (it cleans, copies and hashes the attributes, builds a
measurement object and offers it to an exemplar reservoir); a request through the gateway
and router records about thirty. These instruments keep one running aggregate per series,
found by the attributes as given, for 2-3 us (``just bench-instruments``,
``meshbench/results/instruments.md``).

What they export is what the OpenTelemetry Prometheus exporter exported: the same metric
and label names, units and ``_total`` suffixes (its own naming functions are used), the
same bucket bounds, label values of other types as JSON, series beyond
:data:`SERIES_LIMIT` folded into one ``otel_metric_overflow="true"`` series, negative
counter and histogram values and non-finite values dropped, a failing callback logged and
skipped (the rest of the scrape still answers), and ``target_info`` from the service's
resource. ``tests/test_instruments.py`` checks this
against the SDK and its exporter on the same measurements. Metrics are scraped (Prometheus,
or an OpenTelemetry Collector's Prometheus receiver); they are not pushed over OTLP.
"""

from __future__ import annotations

import bisect
import json
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from opentelemetry.exporter.prometheus._mapping import (
    map_unit,
    sanitize_attribute,
    sanitize_full_name,
)
from opentelemetry.metrics import CallbackOptions, Observation
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.core import Metric as Family

from shared.logging import get_logger

log = get_logger(__name__)

SERIES_LIMIT = 2000
"""Most series one instrument keeps; more fold into one overflow series."""
LOOKUP_LIMIT = 4 * SERIES_LIMIT
"""Most attribute orders remembered for the fast lookup; past it the lookup starts over."""
OVERFLOW: tuple[tuple[str, Any], ...] = (("otel.metric.overflow", True),)
DEFAULT_BOUNDS: tuple[float, ...] = (
    0.0, 5.0, 10.0, 25.0, 50.0, 75.0, 100.0, 250.0, 500.0, 750.0, 1000.0, 2500.0, 5000.0,
    7500.0, 10000.0,
)  # fmt: skip
"""OpenTelemetry's default histogram bounds, for a histogram created without any."""

Attributes = Mapping[str, Any] | None
Key = tuple[tuple[str, Any], ...]
Callback = Callable[[CallbackOptions], Iterable[Observation]]


class _Instrument:
    """Series of one instrument, keyed by their attributes as recorded.

    ``_series`` maps the attributes' items in the order a caller gave them to a mutable
    aggregate; every order of the same attributes maps to the same aggregate object, so a
    recording costs one tuple and one dict lookup.
    """

    kind = "counter"

    def __init__(self, name: str, unit: str, description: str) -> None:
        self.name = name
        self.unit = unit
        self.description = description
        self._lock = threading.Lock()
        self._series: dict[Key, list[float]] = {}
        self._canonical: dict[Key, list[float]] = {}

    def _aggregate(self, attributes: Attributes) -> list[float]:
        key: Key = tuple(attributes.items()) if attributes else ()
        try:
            found = self._series.get(key)
        except TypeError:  # an unhashable value (a list): as the exporter shows it
            key = tuple((k, v if _hashable(v) else json.dumps(v, default=str)) for k, v in key)
            found = self._series.get(key)
        if found is None:
            with self._lock:
                canonical = tuple(sorted(key))
                found = self._canonical.get(canonical)
                if found is not None or len(self._canonical) < SERIES_LIMIT:
                    if found is None:
                        found = self._canonical[canonical] = self._empty()
                    if len(self._series) >= LOOKUP_LIMIT:
                        self._series.clear()
                    self._series[key] = found
                else:  # folded: not remembered, so callers minting keys cannot grow memory
                    found = self._canonical.get(OVERFLOW)
                    if found is None:
                        found = self._canonical[OVERFLOW] = self._empty()
        return found

    def _empty(self) -> list[float]:
        return [0.0]

    def points(self) -> list[tuple[Key, list[float]]]:
        with self._lock:
            return [(key, list(value)) for key, value in self._canonical.items()]


class Counter(_Instrument):
    """A monotonic sum (``_total`` in Prometheus); negative amounts are ignored."""

    def add(self, amount: float, attributes: Attributes = None) -> None:
        if not amount >= 0 or math.isinf(amount):  # negative, NaN or infinite: dropped
            return
        aggregate = self._aggregate(attributes)
        with self._lock:
            aggregate[0] += amount


class UpDownCounter(Counter):
    """A sum that goes both ways (a gauge in Prometheus)."""

    kind = "gauge"

    def add(self, amount: float, attributes: Attributes = None) -> None:
        if not math.isfinite(amount):
            return
        aggregate = self._aggregate(attributes)
        with self._lock:
            aggregate[0] += amount


class Histogram(_Instrument):
    """Explicit-bucket histogram: an aggregate is the bucket counts, then sum and count."""

    kind = "histogram"

    def __init__(self, name: str, unit: str, description: str, bounds: Sequence[float]) -> None:
        super().__init__(name, unit, description)
        self.bounds = tuple(bounds)  # as given: 4 is le="4", 4.0 is le="4.0"
        self._size = len(self.bounds) + 1

    def _empty(self) -> list[float]:
        return [0.0] * (self._size + 2)

    def record(self, amount: float, attributes: Attributes = None) -> None:
        if not amount >= 0 or math.isinf(amount):  # negative, NaN or infinite: dropped
            return
        aggregate = self._aggregate(attributes)
        index = bisect.bisect_left(self.bounds, amount)  # a value on a bound is in its bucket
        with self._lock:
            aggregate[index] += 1
            aggregate[-2] += amount
            aggregate[-1] += 1


class Observable:
    """Values a callback reports when metrics are collected: a gauge, or a cumulative
    counter (``monotonic``)."""

    def __init__(
        self, name: str, unit: str, description: str, callbacks: Sequence[Callback], kind: str
    ) -> None:
        self.name = name
        self.unit = unit
        self.description = description
        self.kind = kind
        self._callbacks = list(callbacks)

    def points(self) -> list[tuple[Key, list[float]]]:
        """What the callbacks report now; a callback that fails is logged and skipped."""
        observed: dict[Key, list[float]] = {}
        for callback in self._callbacks:
            try:
                for observation in callback(CallbackOptions()):
                    value = float(observation.value)
                    if math.isfinite(value):
                        observed[_key(observation.attributes)] = [value]
            except Exception:
                log.exception("metric callback failed", instrument=self.name)
        return list(observed.items())


class Registry:
    """Every instrument of a process (one per name), collected for a scrape."""

    def __init__(self) -> None:
        self._instruments: dict[str, _Instrument | Observable] = {}
        self._lock = threading.Lock()

    def add(self, instrument: Any) -> Any:
        """``instrument``, or the one of that name made before (which must be alike)."""
        with self._lock:
            made = self._instruments.setdefault(instrument.name, instrument)
        if type(made) is not type(instrument) or made.kind != instrument.kind:
            raise ValueError(f"metric {instrument.name!r} exists as another kind of instrument")
        return made

    def families(self) -> Iterator[Family]:
        with self._lock:
            instruments = list(self._instruments.values())
        for instrument in instruments:
            try:
                family = _family(instrument)
            except Exception:  # one instrument's fault leaves the rest of the scrape
                log.exception("metric not exported", instrument=instrument.name)
                continue
            if family is not None:
                yield family


class Meter:
    """Creates instruments in a :class:`Registry` (the process's unless one is given)."""

    def __init__(self, registry: Registry | None = None) -> None:
        self.registry = registry if registry is not None else REGISTRY

    def create_counter(self, name: str, unit: str = "", description: str = "") -> Counter:
        made: Counter = self.registry.add(Counter(name, unit, description))
        return made

    def create_up_down_counter(
        self, name: str, unit: str = "", description: str = ""
    ) -> UpDownCounter:
        made: UpDownCounter = self.registry.add(UpDownCounter(name, unit, description))
        return made

    def create_histogram(
        self,
        name: str,
        unit: str = "",
        description: str = "",
        explicit_bucket_boundaries_advisory: Sequence[float] | None = None,
    ) -> Histogram:
        bounds = explicit_bucket_boundaries_advisory
        made: Histogram = self.registry.add(
            Histogram(name, unit, description, DEFAULT_BOUNDS if bounds is None else bounds)
        )
        return made

    def create_observable_gauge(
        self, name: str, callbacks: Sequence[Callback] = (), unit: str = "", description: str = ""
    ) -> Observable:
        return self._observable("gauge", name, callbacks, unit, description)

    def create_observable_counter(
        self, name: str, callbacks: Sequence[Callback] = (), unit: str = "", description: str = ""
    ) -> Observable:
        return self._observable("counter", name, callbacks, unit, description)

    def _observable(
        self, kind: str, name: str, callbacks: Sequence[Callback], unit: str, description: str
    ) -> Observable:
        made: Observable = self.registry.add(Observable(name, unit, description, callbacks, kind))
        return made


REGISTRY = Registry()


def get_meter(scope: str) -> Meter:
    """The process's meter; ``scope`` names the instrumenting module (not exported)."""
    del scope
    return Meter(REGISTRY)


class Collector:
    """A prometheus_client collector of a :class:`Registry`, with ``target_info`` from the
    service's resource attributes."""

    def __init__(self, registry: Registry, resource: Mapping[str, Any] | None = None) -> None:
        self.registry = registry
        self.resource = dict(resource or {})

    def collect(self) -> Iterator[Family]:
        if self.resource:
            info = InfoMetricFamily("target", "Target metadata")
            info.add_metric(
                [], {sanitize_attribute(k): _label(v) for k, v in self.resource.items()}
            )
            yield info
        yield from self.registry.families()


def _family(instrument: _Instrument | Observable) -> Family | None:
    points = instrument.points()
    if not points:
        return None
    name = sanitize_full_name(instrument.name)
    unit = map_unit(instrument.unit or "")
    labels = sorted({sanitize_attribute(k) for key, _ in points for k, _ in key})
    rows = []
    for key, value in points:
        present = {sanitize_attribute(k): _label(v) for k, v in key}
        rows.append(([present.get(label, "") for label in labels], value))
    kinds = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily}
    if isinstance(instrument, Histogram):
        family = HistogramMetricFamily(name, instrument.description, labels=labels, unit=unit)
        for row, value in rows:
            cumulative, total = [], 0.0
            for bound, count in zip([*instrument.bounds, "+Inf"], value[:-2], strict=True):
                total += count
                cumulative.append((str(bound), total))
            family.add_metric(row, buckets=cumulative, sum_value=value[-2])
        return family
    sums: CounterMetricFamily | GaugeMetricFamily = kinds[instrument.kind](
        name, instrument.description, labels=labels, unit=unit
    )
    for row, value in rows:
        sums.add_metric(row, value[0])
    return sums


def _key(attributes: Attributes) -> Key:
    """Attributes as a sorted, hashable key (unhashable values as the exporter shows them)."""
    items = attributes.items() if attributes else ()
    return tuple(sorted((k, v if _hashable(v) else json.dumps(v, default=str)) for k, v in items))


def _label(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True
