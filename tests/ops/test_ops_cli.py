"""``meshllm top``'s rendering of the ops service's scrape (the live path runs in
tests/test_supervisor.py against a whole `meshllm up`)."""

from __future__ import annotations

from rich.console import Console

from meshllm.ops_cli import parse_ops_metrics, render_top

SCRAPE = """\
# HELP meshllm_ops_sli SLIs
# TYPE meshllm_ops_sli gauge
meshllm_ops_sli{indicator="p99_s",model="smollm2",operation="chat",window="60s"} 0.512
meshllm_ops_sli{indicator="rate_per_s",model="smollm2",operation="chat",window="60s"} 3.5
meshllm_ops_sli{indicator="error_rate",model="smollm2",operation="chat",window="60s"} 0.002
meshllm_ops_sli{indicator="p99_s",model="[bold]x",operation="chat",window="300s"} 0.1
# HELP meshllm_ops_alerts_firing firing
# TYPE meshllm_ops_alerts_firing gauge
meshllm_ops_alerts_firing{model="smollm2",operation="chat",rule="LatencyP99High",severity="page"} 1
# HELP meshllm_ops_replicas replicas
# TYPE meshllm_ops_replicas gauge
meshllm_ops_replicas{deployment="ChatDeployment"} 2
# HELP meshllm_ops_backlog backlog
# TYPE meshllm_ops_backlog gauge
meshllm_ops_backlog 17
"""


def shown(window: str) -> str:
    console = Console(width=200, record=True)
    console.print(render_top(SCRAPE, window))
    return console.export_text()


def test_top_shows_each_model_with_its_indicators_and_the_alerts_firing() -> None:
    slis, firing = parse_ops_metrics(SCRAPE)
    assert slis[("chat", "smollm2", "60s")]["p99_s"] == 0.512
    assert firing == [{"model": "smollm2", "operation": "chat", "rule": "LatencyP99High",
                       "severity": "page"}]  # fmt: skip
    text = shown("60s")
    assert "smollm2" in text
    assert "512" in text  # p99 in ms
    assert "0.20%" in text  # error rate
    assert "firing: LatencyP99High (page, model=smollm2, operation=chat)" in text
    # a label is shown as text, never as console markup
    assert "[bold]x" in shown("300s")


def test_top_shows_the_replicas_and_the_queue() -> None:
    assert "replicas: ChatDeployment 2; requests waiting: 17" in shown("60s")
