"""The generated Grafana dashboard: not stale, every panel's PromQL parses, and every metric
it names is one the services export (checked against a live scrape in
tests/e2e/test_request_path.py, with :func:`dashboard_metrics`)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import promql_parser
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gen_dashboards.py"
# Series that exist only once something happened (an alert fired); their instruments are
# declared in the code named here, which the test checks.
EVENT_ONLY = {
    "meshllm_ops_alerts_firing": "services/ops/metrics.py",
    # a counter appears with its first decision
    "meshllm_ops_scaling_decisions_total": "services/ops/metrics.py",
    # the answer-quality gauges appear once a rated answer is stored
    "meshllm_feedback_up_rate": "services/feedback/metrics.py",
    "meshllm_feedback_correction_rate": "services/feedback/metrics.py",
}


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_dashboards", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _names(node: Any, found: set[str]) -> None:
    if type(node).__name__ == "VectorSelector":
        found.add(node.name)
        return
    for attribute in ("expr", "lhs", "rhs", "vector_selector", "param"):
        child = getattr(node, attribute, None)
        if child is not None and not isinstance(child, int | float | str):
            _names(child, found)
    for argument in getattr(node, "args", ()):
        _names(argument, found)


def dashboard_metrics() -> set[str]:
    """Every metric the committed dashboard's queries select (parsing each one)."""
    board = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "meshllm.json").read_text())
    found: set[str] = set()
    for panel in board["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "5m")
            _names(promql_parser.parse(expr), found)  # raises on a query that does not parse
    return found


def test_the_committed_dashboard_is_generated_from_the_script() -> None:
    checked = subprocess.run([sys.executable, str(SCRIPT), "--check"], cwd=ROOT,
                             capture_output=True, text=True, check=False)  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_panel_parses_and_the_slo_lines_are_the_rules_thresholds() -> None:
    from services.ops.alerts import DEFAULT_RULES, load_rules

    metrics = dashboard_metrics()
    assert "gen_ai_server_request_duration_seconds_bucket" in metrics
    rules = {rule.name: rule.threshold for rule in load_rules(DEFAULT_RULES)}
    module = generator()
    assert rules["LatencyP99High"] == module.SLO_LATENCY_S
    assert rules["ErrorRateHigh"] == module.SLO_ERROR_RATE
    board = module.build()
    lines = {
        panel["title"]: panel["fieldConfig"]["defaults"]["thresholds"]["steps"][1]["value"]
        for panel in board["panels"]
        if "thresholds" in panel["fieldConfig"]["defaults"]
    }
    assert lines == {"Error rate (5xx answers)": 0.001, "Answer latency P50 / P99": 0.5}


def test_event_only_metrics_are_declared_where_they_say() -> None:
    for name, source in EVENT_ONLY.items():
        declared = re.findall(r'"(meshllm\.[a-z0-9_.]+)"', (ROOT / source).read_text())
        as_prometheus = {d.replace(".", "_") for d in declared}
        assert name.removesuffix("_total") in as_prometheus, name


def test_grafana_provisioning_points_at_the_dashboards_and_prometheus() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"]}
    provider = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/meshllm.yml").read_text()
    )["providers"][0]
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    source = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    board = generator().build()
    assert {p["datasource"]["uid"] for p in board["panels"]} == {source["uid"]}
    assert source["url"] == "http://prometheus:9090"
