"""SLIs over sliding windows, from the answers of :mod:`services.ops.spans`. No I/O.

Answers fall into time buckets (``bucket_s``, by the answer's own end time, so a replay
of the same spans gives the same windows) and, within a bucket, into cells by operation,
model and tenant. A cell keeps counts and two DDSketches (latency, time to first token):
mergeable sketches with a relative-accuracy guarantee (1% by default), so a window's P99
for any grouping (per model, per tenant, everything) is the merge of its cells' sketches,
not an average of percentiles.

Bounded whatever the spans say: buckets older than ``keep_s`` by the clock (not by the
newest answer) are dropped, an answer from more than ``MAX_SKEW_S`` in the future is
refused, and a bucket holds at most ``MAX_CELLS`` cells, later keys folding into one
``other`` cell per operation. A window is the buckets that start after ``now - window``,
and its rates divide by the time those buckets cover up to now.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field

from ddsketch import DDSketch

from services.ops.spans import Answer
from shared.metrics import OTHER

DIMENSIONS = ("operation", "model", "model_version", "pool", "tenant")
RELATIVE_ACCURACY = 0.01
MAX_SKEW_S = 60.0
MAX_CELLS = 1000
MAX_BUSY_S = 600.0  # one answer's share of the concurrency (a forged hour-long one: 10 min)

Labels = tuple[tuple[str, str], ...]
"""A group's labels, e.g. (("model", "smollm2"),); () is everything."""


def _sketch() -> DDSketch:
    return DDSketch(relative_accuracy=RELATIVE_ACCURACY)


@dataclass
class _Cell:
    requests: int = 0
    failures: int = 0
    output_tokens: int = 0
    busy_s: float = 0.0  # the answers' durations summed
    latency: DDSketch = field(default_factory=_sketch)
    first_token: DDSketch = field(default_factory=_sketch)

    def add(self, answer: Answer) -> None:
        self.requests += 1
        self.failures += answer.failed
        self.output_tokens += answer.output_tokens
        self.busy_s += min(answer.seconds, MAX_BUSY_S)
        self.latency.add(answer.seconds)
        if answer.first_token_s is not None:
            self.first_token.add(answer.first_token_s)

    def merge(self, other: _Cell) -> None:
        self.requests += other.requests
        self.failures += other.failures
        self.output_tokens += other.output_tokens
        self.busy_s += other.busy_s
        self.latency.merge(other.latency)
        self.first_token.merge(other.first_token)


@dataclass(frozen=True)
class Sli:
    """One group's indicators over one window."""

    window_s: float
    requests: int
    failures: int
    output_tokens: int
    busy_s: float  # the answers' durations summed
    streamed: int  # answers with a first-token time (streams)
    p50_s: float | None
    p99_s: float | None
    ttft_p50_s: float | None
    ttft_p99_s: float | None

    @property
    def rate_per_s(self) -> float:
        return self.requests / self.window_s

    @property
    def error_rate(self) -> float | None:
        return self.failures / self.requests if self.requests else None

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.window_s

    @property
    def concurrency(self) -> float:
        """Answers in progress on average over the window (Little's law: their summed
        durations over the window's length): the load the group put on its replicas."""
        return self.busy_s / self.window_s

    def count_for(self, indicator: str) -> int:
        """The answers ``indicator`` is computed from (streams only for first-token times)."""
        return self.streamed if indicator.startswith("ttft_") else self.requests

    def value(self, name: str) -> float | None:
        """The indicator called ``name`` (a field or property: p99_s, error_rate, ...)."""
        found = getattr(self, name)
        return None if found is None else float(found)


INDICATORS = frozenset(
    {"requests", "failures", "rate_per_s", "error_rate", "tokens_per_s",
     "concurrency", "p50_s", "p99_s", "ttft_p50_s", "ttft_p99_s"}
)  # fmt: skip

Clock = Callable[[], float]


class SliWindows:
    """Answers bucketed by time; SLIs of any window ending now, grouped by any labels."""

    def __init__(
        self, bucket_s: float = 10.0, keep_s: float = 900.0, clock: Clock = time.time
    ) -> None:
        if bucket_s <= 0 or keep_s < bucket_s:
            raise ValueError("bucket_s must be > 0 and keep_s >= bucket_s")
        self.bucket_s = bucket_s
        self.keep_s = keep_s
        self.clock = clock
        self._buckets: dict[int, dict[tuple[str, ...], _Cell]] = {}
        self.too_old = 0  # answers older than the windows reach
        self.from_future = 0  # answers more than MAX_SKEW_S ahead of the clock
        self.folded = 0  # answers counted in an "other" cell (a bucket was full)

    def add(self, answer: Answer) -> None:
        now = self.clock()
        if answer.at_s > now + MAX_SKEW_S:
            self.from_future += 1
            return
        if answer.at_s < now - self.keep_s:
            self.too_old += 1
            return
        bucket = self._buckets.setdefault(int(answer.at_s // self.bucket_s), {})
        key = (answer.operation, answer.model, answer.model_version, answer.pool, answer.tenant)
        if key not in bucket and len(bucket) >= MAX_CELLS:
            key = (answer.operation, OTHER, OTHER, OTHER, OTHER)
            self.folded += 1
        bucket.setdefault(key, _Cell()).add(answer)
        self._forget(now)

    def add_all(self, answers: Iterable[Answer]) -> None:
        for answer in answers:
            self.add(answer)

    def _forget(self, now: float) -> None:
        oldest = int((now - self.keep_s) // self.bucket_s)
        for index in [i for i in list(self._buckets) if i < oldest]:
            self._buckets.pop(index, None)

    def slis(
        self,
        now_s: float,
        window_s: float,
        by: Iterable[str] = (),
        where: Mapping[str, Collection[str]] | None = None,
    ) -> dict[Labels, Sli]:
        """Each group's SLIs over the buckets that start after ``now_s - window_s``, of
        the answers whose labels are among ``where``'s values (all answers: None).

        Safe to call from another thread than the one adding (a metrics exporter's): it
        reads copies of the bucket and cell lists."""
        names = tuple(by)
        where = where or {}
        if unknown := (set(names) | set(where)) - set(DIMENSIONS):
            raise ValueError(f"unknown label(s) {sorted(unknown)}; labels are {DIMENSIONS}")
        first = int((now_s - window_s) // self.bucket_s) + 1
        last = int(now_s // self.bucket_s)
        groups: dict[Labels, _Cell] = {}
        for index, cells in list(self._buckets.items()):
            if not first <= index <= last:
                continue
            for key, cell in list(cells.items()):
                values = dict(zip(DIMENSIONS, key, strict=True))
                if any(values[name] not in allowed for name, allowed in where.items()):
                    continue
                labels = tuple((name, values[name]) for name in names)
                groups.setdefault(labels, _Cell()).merge(cell)
        span_s = max(now_s - first * self.bucket_s, self.bucket_s / 1000)
        return {labels: _sli(cell, span_s) for labels, cell in groups.items()}


def _sli(cell: _Cell, window_s: float) -> Sli:
    def quantile(sketch: DDSketch, q: float) -> float | None:
        return sketch.get_quantile_value(q) if sketch.count else None

    return Sli(
        window_s=window_s,
        requests=cell.requests,
        failures=cell.failures,
        output_tokens=cell.output_tokens,
        busy_s=cell.busy_s,
        streamed=cell.first_token.count,
        p50_s=quantile(cell.latency, 0.5),
        p99_s=quantile(cell.latency, 0.99),
        ttft_p50_s=quantile(cell.first_token, 0.5),
        ttft_p99_s=quantile(cell.first_token, 0.99),
    )
