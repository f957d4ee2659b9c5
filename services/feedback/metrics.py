"""The feedback service's metrics: ratings taken in, and answer quality per model version.

Quality is the seed's "inference accuracy" signal, read by the ops service and the release
gate: ``meshllm.feedback.up_rate`` and ``meshllm.feedback.correction_rate`` per model and
version, each with its 95% Wilson interval (``bound=low|high``) next to the point value
(``bound=point``), and ``meshllm.feedback.rated`` (how many answers the rates rest on). They
are refreshed from the store every ``quality_interval_s``, so every replica of the service
shows the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from opentelemetry.metrics import CallbackOptions, Observation

from services.feedback.quality import QualityCounts, wilson
from shared.instruments import get_meter

_meter = get_meter("meshllm.feedback")
_ratings = _meter.create_counter(
    "meshllm.feedback.ratings",
    unit="{rating}",
    description="Feedback events taken in, by outcome (stored, superseded, rejected)",
)
_latest: list[QualityCounts] = []


def taken(outcome: str) -> None:
    _ratings.add(1, {"outcome": outcome})


def quality(rows: Sequence[QualityCounts]) -> None:
    """The latest per-version counts, as the gauges will show them."""
    _latest[:] = rows


def _labels(row: QualityCounts) -> dict[str, str]:
    return {"gen_ai.request.model": row.model, "meshllm.model.version": row.model_version}


def _rates(successes: str) -> Iterator[Observation]:
    for row in _latest:
        count = row.up if successes == "up" else row.corrected
        low, high = wilson(count, row.rated)
        point = count / row.rated if row.rated else 0.0
        for bound, value in (("point", point), ("low", low), ("high", high)):
            yield Observation(value, {**_labels(row), "bound": bound})


def _observe_up(options: CallbackOptions) -> Iterator[Observation]:
    yield from _rates("up")


def _observe_corrections(options: CallbackOptions) -> Iterator[Observation]:
    yield from _rates("corrected")


def _observe_rated(options: CallbackOptions) -> Iterator[Observation]:
    for row in _latest:
        yield Observation(row.rated, _labels(row))


_meter.create_observable_gauge(
    "meshllm.feedback.up_rate",
    callbacks=[_observe_up],
    unit="1",
    description="Share of rated answers rated up (or 4-5), with its 95% Wilson interval",
)
_meter.create_observable_gauge(
    "meshllm.feedback.correction_rate",
    callbacks=[_observe_corrections],
    unit="1",
    description="Share of rated answers a rater corrected, with its 95% Wilson interval",
)
_meter.create_observable_gauge(
    "meshllm.feedback.rated",
    callbacks=[_observe_rated],
    unit="{answer}",
    description="Rated answers per model version (each rater's latest rating counts once)",
)
