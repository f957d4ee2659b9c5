"""The ops rules as Prometheus rules: generated from rules.yaml, accepted by promtool, and
evaluated by Prometheus' own rule engine (``promtool test rules``) on series shaped like the
gateway's metrics: slow answers fire the latency alert, failing ones the error-rate alert,
fast and good ones neither."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from meshllm.cli import app
from services.ops.alerts import DEFAULT_RULES, Rule, load_rules
from services.ops.prometheus_rules import NotExportable, prometheus_rules, rules_file_text
from tests.ops.tools import debian_tool

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "deploy" / "prometheus" / "rules.yml"
SOURCE = "services/ops/rules.yaml"

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def promtool() -> str:
    """promtool, from Debian's prometheus package; installed when missing and this is root."""
    return debian_tool(("promtool",), "prometheus", "to check and evaluate the alerting rules")


def test_the_committed_prometheus_rules_are_generated_from_rules_yaml() -> None:
    expected = rules_file_text(load_rules(DEFAULT_RULES), SOURCE)
    assert GENERATED.read_text() == expected, (
        "deploy/prometheus/rules.yml is stale: run "
        "`meshllm ops prometheus-rules --out deploy/prometheus/rules.yml`"
    )
    printed = CliRunner().invoke(app, ["ops", "prometheus-rules"])
    assert printed.exit_code == 0
    assert printed.output == expected


def test_a_rule_by_tenant_cannot_be_exported_and_says_why(tmp_path: Path) -> None:
    rule = Rule(name="X", indicator="p99_s", threshold=1, clear=1, for_s=1, clear_for_s=1,
                window_s=60, by=("tenant",), summary="s")  # fmt: skip
    with pytest.raises(NotExportable, match="rule X: grouped by \\['tenant'\\]"):
        prometheus_rules([rule], "x")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"rules": [rule.model_dump(mode="json")]}))
    refused = CliRunner().invoke(app, ["ops", "prometheus-rules", "--rules", str(path)])
    assert refused.exit_code == 2
    assert "tenant" in refused.output


def test_promtool_accepts_the_rules_and_the_compose_prometheus_config(promtool: str) -> None:
    checked = subprocess.run([promtool, "check", "rules", str(GENERATED)],
                             capture_output=True, text=True, check=False)  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 6 rules found" in checked.stdout + checked.stderr
    config = subprocess.run(
        [promtool, "check", "config", str(GENERATED.with_name("prometheus.yml"))],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert config.returncode == 0, config.stdout + config.stderr


def series(name: str, labels: dict[str, str], per_step: float, steps: int = 60) -> dict[str, str]:
    """A counter that grows by ``per_step`` every 15 s."""
    inner = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": f"0+{per_step:g}x{steps}"}


def answers_of(seconds_le: str, per_step: float, status: str = "200") -> list[dict[str, str]]:
    """Histogram series of answers that all took at most ``seconds_le`` (and more than the
    bound below it), ``per_step`` of them every 15 s."""
    base = {"gen_ai_operation_name": "chat", "gen_ai_request_model": MODEL,
            "http_response_status_code": status}  # fmt: skip
    bounds = ["0.1", "0.25", "0.5", "1.0", "+Inf"]
    found = [
        series("gen_ai_server_request_duration_seconds_bucket", {**base, "le": bound},
               per_step if bounds.index(bound) >= bounds.index(seconds_le) else 0)
        for bound in bounds
    ]  # fmt: skip
    found.append(series("gen_ai_server_request_duration_seconds_count", base, per_step))
    return found


def expected(rule_name: str, labels: dict[str, str]) -> dict[str, Any]:
    [rule] = [
        r
        for r in prometheus_rules(load_rules(DEFAULT_RULES), SOURCE)["groups"][0]["rules"]
        if r["alert"] == rule_name
    ]
    return {"exp_labels": {**rule["labels"], **labels}, "exp_annotations": rule["annotations"]}


def test_prometheus_evaluates_the_generated_rules_as_the_ops_service_does(
    promtool: str, tmp_path: Path
) -> None:
    chat = {"gen_ai_operation_name": "chat", "gen_ai_request_model": MODEL}
    cases = {
        # 10 answers per 15 s, each between 0.5 s and 1 s: P99 over 500 ms
        "slow": (answers_of("1.0", 10), {"LatencyP99High": [expected("LatencyP99High", chat)],
                                         "ErrorRateHigh": []}),
        # 9 good and 1 failing (503) answer per 15 s, all fast: 10% errors
        "failing": (answers_of("0.1", 9) + answers_of("0.1", 1, status="503"),
                    {"ErrorRateHigh": [expected("ErrorRateHigh", {"gen_ai_request_model": MODEL})],
                     "LatencyP99High": []}),
        "fine": (answers_of("0.1", 10), {"LatencyP99High": [], "ErrorRateHigh": []}),
        # slow, but one answer a minute: 5 in the window, under min_requests (20)
        "few": (answers_of("1.0", 0.25), {"LatencyP99High": []}),
    }  # fmt: skip
    tests = [
        {
            "name": name,
            "interval": "15s",
            "input_series": inputs,
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": alert, "exp_alerts": alerts}
                for alert, alerts in outcomes.items()
            ],
        }
        for name, (inputs, outcomes) in cases.items()
    ]
    unit = tmp_path / "tests.yml"
    unit.write_text(yaml.safe_dump({"rule_files": [str(GENERATED)], "evaluation_interval": "15s",
                                    "tests": tests}))  # fmt: skip
    ran = subprocess.run([promtool, "test", "rules", str(unit)],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert ran.returncode == 0, ran.stdout + ran.stderr
