"""``meshllm ops report``: an HTML page of the last hour (or any span) for people who would
rather look than read.

It reads from the broker, not from the ops service: the answers' spans on
``telemetry.spans`` (the gateway's, as the ops service reads them:
:func:`services.ops.spans.answers`), the alerts on ``ops.alerts`` and the replica
decisions on ``ops.scaling`` since ``--since`` ago (the topics keep a day, a week, a day).
Per minute: answers/s, error rate, P50/P99 latency and P99 time to first token (the ops
service's sketches, :class:`services.ops.sli.SliWindows`), plotted with the SLO lines, the
alerts' firing spans and the decisions; then the events as tables. One self-contained
file (the plot is embedded), safe to mail: every text from the topics is escaped.
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from services.ops.sli import SliWindows
from services.ops.spans import ANSWER_SERVICE, Answer, NotSpans, answers
from shared.events.v1 import events_pb2 as ev

BUCKET_S = 60.0
SLO_P99_S = 0.5
SLO_ERRORS = 0.001
_SINCE = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def parse_since(text: str) -> float:
    """``90s``, ``30m``, ``1h``, ``2d`` as seconds.

    Raises:
        ValueError: anything else, or more than 7 days (the longest the topics keep).
    """
    found = _SINCE.fullmatch(text.strip())
    if not found:
        raise ValueError(f"--since {text!r}: a number and s, m, h or d (e.g. 1h)")
    seconds = float(found[1]) * _UNIT_S[found[2]]
    if not 0 < seconds <= 7 * 86_400:
        raise ValueError(f"--since {text!r}: between 1s and 7d")
    return seconds


@dataclass(frozen=True)
class Minute:
    start_s: float
    rate_per_s: float
    error_rate: float | None
    p50_s: float | None
    p99_s: float | None
    ttft_p99_s: float | None


@dataclass(frozen=True)
class Event:
    at_s: float
    kind: str  # "firing", "resolved", "scaling"
    text: str
    key: str = ""  # the alert id: a firing and its resolution share it


def span_answers(records: Sequence[tuple[bytes | None, bytes | None]]) -> list[Answer]:
    """The answers of ``telemetry.spans`` records ((key, value) pairs); others skipped."""
    found: list[Answer] = []
    for key, value in records:
        if key != ANSWER_SERVICE.encode():
            continue
        try:
            found.extend(answers(value or b""))
        except NotSpans:
            continue  # the ops service dead-letters these; a report skips them
    return found


def events(alerts: Sequence[ev.OpsAlert], decisions: Sequence[ev.ScalingDecision]) -> list[Event]:
    found = []
    for alert in alerts:
        state = "firing" if alert.state == ev.ALERT_STATE_FIRING else "resolved"
        labels = ", ".join(f"{k}={v}" for k, v in sorted(alert.labels.items()))
        text = f"{alert.rule} ({labels}) value {alert.value:.4g}, threshold {alert.threshold:g}"
        at_s = alert.envelope.occurred_at.ToNanoseconds() / 1e9
        found.append(Event(at_s, state, text, alert.alert_id))
    for decision in decisions:
        text = (f"{decision.deployment} {decision.current_replicas} -> "
                f"{decision.target_replicas}: {decision.reason}")  # fmt: skip
        found.append(Event(decision.envelope.occurred_at.ToNanoseconds() / 1e9, "scaling", text))
    return sorted(found, key=lambda e: e.at_s)


def minutes(found: Sequence[Answer], since_s: float, now_s: float) -> list[Minute]:
    windows = SliWindows(BUCKET_S, max(BUCKET_S, now_s - since_s + BUCKET_S), clock=lambda: now_s)
    windows.add_all(a for a in found if since_s <= a.at_s <= now_s)
    rows = []
    start = since_s - since_s % BUCKET_S
    while start < now_s:
        end = start + BUCKET_S
        sli = windows.slis(end - 1e-6, BUCKET_S).get(())
        if sli is not None and sli.requests:
            rows.append(Minute(start, sli.requests / BUCKET_S, sli.error_rate, sli.p50_s,
                               sli.p99_s, sli.ttft_p99_s))  # fmt: skip
        start = end
    return rows


def _clock(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")


def plot_png(rows: Sequence[Minute], found: Sequence[Event]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    figure, (latency, errors, rate) = plt.subplots(3, 1, figsize=(11, 8), sharex=True,
                                                   height_ratios=[3, 1.5, 1.5])  # fmt: skip
    when = [datetime.fromtimestamp(r.start_s + BUCKET_S / 2, UTC) for r in rows]

    def series(values: list[float | None], scale: float = 1.0) -> list[float]:
        return [float("nan") if v is None else v * scale for v in values]

    latency.plot(when, series([r.p50_s for r in rows], 1000), label="P50", color="tab:blue")
    latency.plot(when, series([r.p99_s for r in rows], 1000), label="P99", color="tab:red")
    latency.plot(when, series([r.ttft_p99_s for r in rows], 1000), label="TTFT P99",
                 color="tab:purple", linestyle="--")  # fmt: skip
    latency.axhline(SLO_P99_S * 1000, color="black", linestyle=":", label="SLO 500 ms")
    latency.set_ylabel("ms per minute")
    errors.plot(when, series([r.error_rate for r in rows], 100), color="tab:red")
    errors.axhline(SLO_ERRORS * 100, color="black", linestyle=":")
    errors.set_ylabel("errors %")
    rate.plot(when, [r.rate_per_s for r in rows], color="tab:green")
    rate.set_ylabel("answers/s")
    firing: dict[str, float] = {}
    for event in found:
        moment = datetime.fromtimestamp(event.at_s, UTC)
        if event.kind == "firing":
            firing[event.key] = event.at_s
        elif event.kind == "resolved" and event.key in firing:
            start = datetime.fromtimestamp(firing.pop(event.key), UTC)
            latency.axvspan(start, moment, color="tab:red", alpha=0.08)
        elif event.kind == "scaling":
            for axis in (latency, errors, rate):
                axis.axvline(moment, color="tab:blue", linestyle=":", linewidth=1)
    last = when[-1] if when else datetime.now(UTC)
    for since in firing.values():  # still firing
        latency.axvspan(datetime.fromtimestamp(since, UTC), last, color="tab:red", alpha=0.08)
    latency.legend(loc="upper left", fontsize=8)
    latency.set_title("Answers per minute (shaded: alerts firing; dotted blue: scaling)")
    rate.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M", tz=UTC))  # type: ignore[no-untyped-call]
    rate.set_xlabel("UTC")
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=100)
    plt.close(figure)
    return out.getvalue()


def render(rows: Sequence[Minute], found: Sequence[Event], since_s: float, now_s: float,
           answered: int) -> str:  # fmt: skip
    """The whole page."""
    image = base64.b64encode(plot_png(rows, found)).decode() if rows or found else ""

    def cell(value: float | None, scale: float, shape: str) -> str:
        return "" if value is None else shape.format(value * scale)

    table = "".join(
        f"<tr><td>{_clock(r.start_s)}</td><td>{r.rate_per_s:.2f}</td>"
        f"<td>{cell(r.error_rate, 100, '{:.2f}%')}</td><td>{cell(r.p50_s, 1000, '{:.0f}')}</td>"
        f"<td>{cell(r.p99_s, 1000, '{:.0f}')}</td>"
        f"<td>{cell(r.ttft_p99_s, 1000, '{:.0f}')}</td></tr>"
        for r in rows
    )
    listed = "".join(
        f"<tr><td>{_clock(e.at_s)}</td><td>{html.escape(e.kind)}</td>"
        f"<td>{html.escape(e.text)}</td></tr>"
        for e in found
    )
    picture = f'<img alt="answers per minute" src="data:image/png;base64,{image}">' if image else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>meshllm ops report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}
td:nth-child(3){{text-align:left}}</style>
</head><body>
<h1>meshllm ops report</h1>
<p>{_clock(since_s)} to {_clock(now_s)} UTC: {answered} answers, read from telemetry.spans;
alerts from ops.alerts, replica decisions from ops.scaling. SLO lines: P99 500 ms,
errors 0.1%.</p>
{picture or "<p>No answers and no events in this span.</p>"}
<h2>Alerts and scaling</h2>
<table><tr><th>UTC</th><th>event</th><th>detail</th></tr>{listed}</table>
<h2>Per minute</h2>
<table><tr><th>UTC</th><th>answers/s</th><th>errors</th><th>P50 ms</th><th>P99 ms</th>
<th>TTFT P99 ms</th></tr>{table}</table>
</body></html>
"""


async def read_since(
    settings: Any,
    bootstrap: str,
    topic: Any,
    since_s: float,
    keep: Callable[[list[Any]], list[Any]] = list,
) -> list[Any]:
    """``keep`` of the records of ``topic`` from ``since_s`` on (by their timestamps) up to
    its end now, applied batch by batch: a day of spans is never held as raw records."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from shared.bus.security import client_options

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, **client_options(settings.kafka)
    )
    await consumer.start()
    found: list[Any] = []
    try:
        partitions = [TopicPartition(topic.name, p) for p in range(topic.partitions)]
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        starts = await consumer.offsets_for_times({tp: int(since_s * 1000) for tp in partitions})
        for tp in partitions:
            at = starts.get(tp)
            consumer.seek(tp, at.offset if at is not None else ends[tp])
        while any([await consumer.position(tp) < ends[tp] for tp in partitions]):
            for records in (await consumer.getmany(timeout_ms=500)).values():
                found += keep([r for r in records if r.timestamp >= since_s * 1000])
    finally:
        await consumer.stop()
    return found
