"""The ops loop at a terminal: ``meshllm top``, ``meshllm alerts``, ``meshllm ops ...``
(``ops report``'s page is built in :mod:`meshllm.ops_report`).

``top`` reads the ops service's ``/metrics`` (its SLIs per operation and model, the alerts
firing) and shows them, refreshed; ``alerts`` reads ``ops.alerts`` from the broker and
shows each alert's latest state. Both find the running mesh as ``meshllm status`` does
(its state file), or take ``--url`` / the broker settings for a cluster.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from meshllm.state import cli_settings, read_state
from shared.settings import MeshSettings

ops_app = typer.Typer(help="The ops service's alert rules.", no_args_is_help=True)
console = Console()
errors = Console(stderr=True, soft_wrap=True)

COLUMNS = (  # (indicator, header, scale, format)
    ("rate_per_s", "req/s", 1.0, "{:.2f}"),
    ("error_rate", "errors", 100.0, "{:.2f}%"),
    ("p50_s", "p50 ms", 1000.0, "{:.0f}"),
    ("p99_s", "p99 ms", 1000.0, "{:.0f}"),
    ("ttft_p99_s", "TTFT p99 ms", 1000.0, "{:.0f}"),
    ("tokens_per_s", "tok/s", 1.0, "{:.1f}"),
)


def ops_metrics_url(settings: MeshSettings) -> str | None:
    """The running mesh's ops service's /metrics, from the state file (None: not running)."""
    state = read_state(settings)
    ops = (state or {}).get("services", {}).get("ops")
    if not state or not ops:
        return None
    return f"http://{state['health_host']}:{ops['health_port']}/metrics"


Slis = dict[tuple[str, ...], dict[str, float]]


def parse_ops_metrics(text: str) -> tuple[Slis, list[dict[str, str]]]:
    """({(operation, model, window): {indicator: value}}, [firing alert labels])."""
    from prometheus_client.parser import text_string_to_metric_families

    slis: Slis = {}
    firing: list[dict[str, str]] = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "meshllm_ops_sli":
                key = (
                    labels.get("operation", ""),
                    labels.get("model", ""),
                    labels.get("window", ""),
                )
                slis.setdefault(key, {})[labels.get("indicator", "")] = float(sample.value)
            elif sample.name == "meshllm_ops_alerts_firing" and sample.value > 0:
                firing.append(dict(labels))
    return slis, firing


def parse_capacity(text: str) -> tuple[dict[str, int], int | None]:
    """({deployment: replicas}, the router's backlog) as the ops service knows them."""
    from prometheus_client.parser import text_string_to_metric_families

    replicas: dict[str, int] = {}
    backlog = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "meshllm_ops_replicas":
                replicas[sample.labels.get("deployment", "?")] = int(sample.value)
            elif sample.name == "meshllm_ops_backlog":
                backlog = int(sample.value)
    return replicas, backlog


def render_top(text: str, window: str) -> Table:
    slis, firing = parse_ops_metrics(text)
    table = Table(title=f"meshllm top: answers over the last {window} (from their spans)")
    for header in ("operation", "model", *(column[1] for column in COLUMNS)):
        table.add_column(header, justify="left" if header in {"operation", "model"} else "right")
    for (operation, model, found_window), values in sorted(slis.items()):
        if found_window != window:
            continue
        cells = []
        for indicator, _, scale, shape in COLUMNS:
            value = values.get(indicator)
            cells.append("-" if value is None else shape.format(value * scale))
        table.add_row(escape(operation), escape(model), *cells)
    if not table.rows:
        table.add_row("-", "no answers in this window", *("" for _ in COLUMNS))
    caption = ", ".join(_alert_text(alert) for alert in firing)
    table.caption = f"firing: {caption}" if firing else "no alert firing"
    replicas, backlog = parse_capacity(text)
    if replicas or backlog is not None:
        counts = ", ".join(f"{escape(name)} {count}" for name, count in sorted(replicas.items()))
        waiting = "unknown" if backlog is None else str(backlog)
        table.caption += f"\nreplicas: {counts or 'unknown'}; requests waiting: {waiting}"
    return table


def _alert_text(alert: dict[str, str]) -> str:
    labels = "".join(
        f", {escape(k)}={escape(v)}"
        for k, v in sorted(alert.items())
        if k not in {"rule", "severity"}
    )
    return (
        f"[red]{escape(alert.get('rule', '?'))}[/red] ({escape(alert.get('severity', ''))}{labels})"
    )


def top(
    url: Annotated[
        str | None, typer.Option(help="The ops service's /metrics (default: the running mesh's).")
    ] = None,
    window: Annotated[str, typer.Option(help="60s or 300s.")] = "60s",
    interval: Annotated[float, typer.Option(min=0.5, help="Seconds between refreshes.")] = 2.0,
    once: Annotated[bool, typer.Option("--once", help="Print once and exit.")] = False,
) -> None:
    """A live view of the SLIs per operation and model, and the alerts firing."""
    if window not in {"60s", "300s"}:
        errors.print("[red]--window: 60s or 300s[/red]")
        raise typer.Exit(2)
    target = url or ops_metrics_url(cli_settings())
    if target is None:
        errors.print("no ops service is running here (start the mesh with `meshllm up`, or --url)")
        raise typer.Exit(1)

    def fetch() -> Table:
        try:
            return render_top(httpx.get(target, timeout=5).text, window)
        except httpx.HTTPError as error:
            raise typer.Exit(_unreachable(target, error)) from None

    if once:
        console.print(fetch())
        return
    with Live(fetch(), console=console, auto_refresh=False) as live:
        while True:
            time.sleep(interval)
            live.update(fetch(), refresh=True)


def _unreachable(target: str, error: Exception) -> int:
    errors.print(f"[red]no answer from {escape(target)}: {escape(str(error))}[/red]")
    return 1


async def read_alerts(settings: MeshSettings, bootstrap: str) -> dict[str, Any]:
    """Every alert's latest event on ops.alerts, by alert id (the ops service's own only)."""
    from services.ops.history import latest_alerts

    return {key: found.alert for key, found in (await latest_alerts(settings, bootstrap)).items()}


def alerts(
    show_all: Annotated[
        bool, typer.Option("--all", help="Resolved alerts too (ops.alerts keeps 7 days).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """The alerts firing now (each alert's latest event on ops.alerts)."""
    from google.protobuf.json_format import MessageToDict

    from shared.events.v1 import events_pb2 as ev

    settings = cli_settings()
    state = read_state(settings)
    bootstrap = str(state["bootstrap"]) if state else settings.kafka.bootstrap
    try:
        latest = asyncio.run(asyncio.wait_for(read_alerts(settings, bootstrap), 60))
    except (OSError, TimeoutError) as error:
        errors.print(f"[red]cannot read ops.alerts from {escape(bootstrap)}: {error}[/red]")
        raise typer.Exit(1) from None
    except Exception as error:  # aiokafka's connection errors
        errors.print(f"[red]cannot read ops.alerts from {escape(bootstrap)}: {error}[/red]")
        raise typer.Exit(1) from None
    shown = [a for a in latest.values() if show_all or a.state == ev.ALERT_STATE_FIRING]
    if as_json:
        print(json.dumps([MessageToDict(a, preserving_proto_field_name=True) for a in shown]))
        return
    table = Table(title="alerts" + (" (latest state of each)" if show_all else " firing"))
    for header in ("state", "rule", "severity", "labels", "value", "threshold", "since"):
        table.add_column(header)
    for alert in sorted(shown, key=lambda a: a.envelope.occurred_at.ToNanoseconds()):
        table.add_row(
            ev.AlertState.Name(alert.state).removeprefix("ALERT_STATE_").lower(),
            escape(alert.rule),
            escape(alert.severity),
            escape(", ".join(f"{k}={v}" for k, v in sorted(alert.labels.items()))),
            f"{alert.value:.4g}",
            f"{alert.threshold:g}",
            alert.envelope.occurred_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S UTC"),
        )
    console.print(table if shown else "no alert firing" if not show_all else "no alert yet")


@ops_app.command("prometheus-rules")
def ops_prometheus_rules(
    rules: Annotated[
        Path | None, typer.Option(help="The rules file (default: the bundled rules.yaml).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Write them to this file.")] = None,
) -> None:
    """Print (or write) the alert rules as Prometheus alerting rules (promtool-checkable)."""
    from services.ops.alerts import DEFAULT_RULES, RulesError, load_rules
    from services.ops.prometheus_rules import NotExportable, rules_file_text

    path = rules or DEFAULT_RULES
    source = "services/ops/rules.yaml" if rules is None else str(rules)
    try:
        text = rules_file_text(load_rules(path), source)
    except (RulesError, NotExportable) as error:
        errors.print(f"[red]{escape(str(error))}[/red]")
        raise typer.Exit(2) from None
    if out is None:
        print(text, end="")
    else:
        out.write_text(text)
        errors.print(f"wrote {out}")


@ops_app.command("report")
def ops_report(
    since: Annotated[str, typer.Option(help="How far back: 90s, 30m, 1h, 2d.")] = "1h",
    out: Annotated[Path, typer.Option(help="The HTML file to write.")] = Path("ops-report.html"),
) -> None:
    """Write an HTML page of the answers (per minute, plotted), alerts and scaling since then."""
    from meshllm import ops_report as report
    from shared.events.v1 import events_pb2 as ev
    from shared.topics import OPS_ALERTS, OPS_SCALING, TELEMETRY_SPANS

    try:
        seconds = report.parse_since(since)
    except ValueError as error:
        errors.print(f"[red]{escape(str(error))}[/red]")
        raise typer.Exit(2) from None
    settings = cli_settings()
    state = read_state(settings)
    bootstrap = str(state["bootstrap"]) if state else settings.kafka.bootstrap
    now = time.time()

    def answered(records: list[Any]) -> list[Any]:
        return report.span_answers([(r.key, r.value) for r in records])

    async def read() -> tuple[list[Any], list[Any], list[Any]]:
        spans, alerts, scaling = await asyncio.gather(
            report.read_since(settings, bootstrap, TELEMETRY_SPANS, now - seconds, keep=answered),
            report.read_since(settings, bootstrap, OPS_ALERTS, now - seconds),
            report.read_since(settings, bootstrap, OPS_SCALING, now - seconds),
        )
        return spans, alerts, scaling

    try:
        spans, alert_records, scaling_records = asyncio.run(asyncio.wait_for(read(), 300))
    except Exception as error:  # OSError, TimeoutError, aiokafka's connection errors
        errors.print(f"[red]cannot read the topics from {escape(bootstrap)}: {error}[/red]")
        raise typer.Exit(1) from None
    found = spans  # decoded batch by batch while read
    alerts = [_parsed(ev.OpsAlert, r.value) for r in alert_records]
    decisions = [_parsed(ev.ScalingDecision, r.value) for r in scaling_records]
    page = report.render(
        report.minutes(found, now - seconds, now),
        report.events([a for a in alerts if a], [d for d in decisions if d]),
        now - seconds,
        now,
        len(found),
    )
    out.write_text(page)
    errors.print(f"wrote {out}: {len(found)} answers, {len(alert_records)} alert events, "
                 f"{len(scaling_records)} scaling decisions")  # fmt: skip


def _parsed(kind: Any, value: bytes | None) -> Any:
    from google.protobuf.message import DecodeError

    try:
        return kind.FromString(value or b"")
    except DecodeError:
        return None
