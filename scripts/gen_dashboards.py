"""Generate the Grafana dashboard of the mesh (``deploy/grafana/dashboards/meshllm.json``).

Run from the repository root: ``python scripts/gen_dashboards.py`` (``--check``: fail if
the committed file differs). Built with the Grafana Foundation SDK; every panel's PromQL
is in :data:`PANELS`, which ``tests/ops/test_dashboards.py`` parses (promql-parser) and
checks against the metrics the services export. Panels: request rate, error rate and
P50/P99 latency against the SLO lines, time to first token, tokens/s, queue depth by
priority and consumer lag, pool use (in flight, engine busy share, KV cache), cache hit
rate, audit lag, refusals and alerts.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "deploy" / "grafana" / "dashboards" / "meshllm.json"
UID = "meshllm-overview"
SLO_LATENCY_S = 0.5
SLO_ERROR_RATE = 0.001
DURATION = "gen_ai_server_request_duration_seconds"


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    queries: tuple[tuple[str, str], ...]  # (PromQL, legend)
    slo: float | None = None  # drawn as a red line
    description: str = ""
    width: int = 12
    extra: dict[str, Any] = field(default_factory=dict)


def rate(metric: str, by: str = "", selector: str = "") -> str:
    """``sum by (by) (rate(metric{selector}[$__rate_interval]))``."""
    return f"sum by ({by}) (rate({metric}{selector}[$__rate_interval]))"


def quantile(q: float, histogram: str, by: str = "gen_ai_request_model") -> str:
    return (
        f"histogram_quantile({q}, sum by (le, {by}) (rate({histogram}_bucket[$__rate_interval])))"
    )


MODEL = "gen_ai_request_model"
FIRST_TOKEN = "gen_ai_server_time_to_first_token_seconds"
SERVER_ERROR = '{http_response_status_code=~"5.."}'
ROUTER_LAG = 'meshllm_bus_consumer_lag{messaging_consumer_group_name="router"}'
PREFIX = "meshllm_inference_prefix_cache"

PANELS: tuple[Panel, ...] = (
    Panel("Requests/s by route and status", "reqps", (
        (rate("meshllm_gateway_requests_total", "http_route, http_response_status_code"),
         "{{http_route}} {{http_response_status_code}}"),
    )),
    Panel("Error rate (5xx answers)", "percentunit", (
        (f"{rate(DURATION + '_count', MODEL, SERVER_ERROR)} / {rate(DURATION + '_count', MODEL)}",
         "{{gen_ai_request_model}}"),
    ), slo=SLO_ERROR_RATE, description="SLO: under 0.1%"),
    Panel("Answer latency P50 / P99", "s", (
        (quantile(0.5, DURATION), "p50 {{gen_ai_request_model}}"),
        (quantile(0.99, DURATION), "p99 {{gen_ai_request_model}}"),
    ), slo=SLO_LATENCY_S, description="SLO: P99 under 500 ms (0.5 is a bucket bound)"),
    Panel("Time to first token P50 / P99", "s", (
        (quantile(0.5, FIRST_TOKEN), "p50 {{gen_ai_request_model}}"),
        (quantile(0.99, FIRST_TOKEN), "p99 {{gen_ai_request_model}}"),
    )),
    Panel("Tokens/s generated", "short", (
        (rate("meshllm_inference_tokens_generated_total", "model"), "{{model}}"),
    )),
    Panel("Waiting requests", "short", (
        ("sum by (priority) (meshllm_router_queue_depth)", "fetched, not started: {{priority}}"),
        (f"sum by (messaging_destination_name) ({ROUTER_LAG})",
         "not fetched: {{messaging_destination_name}}"),
    ), description="The demand the mesh sees before an engine does"),
    Panel("Pool use", "short", (
        ("sum by (pool) (meshllm_router_in_flight)", "in flight: {{pool}}"),
        ("sum by (replica) (meshllm_inference_batch_active)", "batch: {{replica}}"),
        (rate("meshllm_inference_engine_busy_seconds_total", "replica"),
         "engine busy share: {{replica}}"),
    )),
    Panel("Caches", "percentunit", (
        (f"{rate(PREFIX + '_hits_total')} / {rate(PREFIX + '_lookups_total')}",
         "prefix-cache hit rate"),
        ("max by (replica) (meshllm_inference_kv_cache_usage)", "KV cache use: {{replica}}"),
    )),
    Panel("Audit: records not yet under a signed checkpoint", "short", (
        ('sum(meshllm_audit_log_records{measure="uncovered"})', "uncovered records"),
        ("max(meshllm_audit_checkpoint_age_seconds)", "checkpoint age (s)"),
    )),
    Panel("Refusals by reason", "reqps", (
        (rate("meshllm_gateway_refusals_total", "reason"), "{{reason}}"),
    )),
    Panel("Replicas and the queue (ops service's scaling)", "short", (
        ("max by (deployment) (meshllm_ops_replicas)", "replicas: {{deployment}}"),
        ("max(meshllm_ops_backlog)", "requests the router has not finished"),
        ("sum by (deployment, reason) (increase(meshllm_ops_scaling_decisions_total[5m]))",
         "decisions: {{deployment}} {{reason}}"),
    ), description="Replica counts the ops loop decided, and what it decided from"),
    Panel("Answer quality from feedback (95% intervals)", "percentunit", (
        ('max by (gen_ai_request_model, meshllm_model_version, bound) (meshllm_feedback_up_rate)',
         "up-rate {{bound}}: {{gen_ai_request_model}} {{meshllm_model_version}}"),
        ('max by (gen_ai_request_model, meshllm_model_version) '
         '(meshllm_feedback_correction_rate{bound="point"})',
         "corrected: {{gen_ai_request_model}} {{meshllm_model_version}}"),
    ), description="Rated answers per model version; low/high bound the up-rate's 95% interval"),
    Panel("Alerts firing (ops service)", "short", (
        ("sum by (rule) (meshllm_ops_alerts_firing)", "{{rule}}"),
    )),
)  # fmt: skip


def build() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model (a dict)."""
    from grafana_foundation_sdk.builders import common, dashboard, prometheus, timeseries
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.common import GraphTresholdsStyleMode
    from grafana_foundation_sdk.models.dashboard import DataSourceRef, Threshold, ThresholdsMode

    source = DataSourceRef(type_val="prometheus", uid="prometheus")
    board = (
        dashboard.Dashboard("meshllm: SLOs and the mesh")
        .uid(UID)
        .tags(["meshllm", "generated"])
        .refresh("30s")
        .time("now-1h", "now")
        .description("Generated by scripts/gen_dashboards.py; edit that, not this.")
    )
    for panel in PANELS:
        built = (
            timeseries.Panel()
            .title(panel.title)
            .unit(panel.unit)
            .datasource(source)
            .span(panel.width)
            .height(8)
        )
        if panel.description:
            built = built.description(panel.description)
        if panel.slo is not None:
            steps = [Threshold(value=None, color="green"), Threshold(value=panel.slo, color="red")]
            built = built.thresholds(
                dashboard.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(steps)
            ).thresholds_style(
                common.GraphThresholdsStyleConfig().mode(GraphTresholdsStyleMode.LINE)
            )
        for index, (expr, legend) in enumerate(panel.queries):
            built = built.with_target(
                prometheus.Dataquery()
                .expr(expr)
                .legend_format(legend)
                .ref_id(chr(ord("A") + index))
                .datasource(source)
            )
        board = board.with_panel(built)
    encoded: dict[str, Any] = json.loads(JSONEncoder(sort_keys=True).encode(board.build()))
    return encoded


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed file is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT.relative_to(ROOT)} is stale: run python scripts/gen_dashboards.py")
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
