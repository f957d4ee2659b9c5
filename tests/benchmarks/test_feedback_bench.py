"""The feedback benchmark's report and plot, from measured-shaped results."""

from __future__ import annotations

from pathlib import Path

from meshbench.feedback_bench import Result, plot, report


def test_the_verdict_follows_the_p95_and_missing_ratings(tmp_path: Path) -> None:
    fast = Result(100, 10.0, accepted=100, latencies_s=[0.2] * 96 + [1.0] * 4)
    assert "**pass**" in report(fast, "cmd")
    assert "| stored / missing after 300 s | 100 / 0 |" in report(fast, "cmd")
    slow = Result(100, 10.0, accepted=100, latencies_s=[0.2] * 90 + [61.0] * 10)
    assert "**FAIL**" in report(slow, "cmd")
    lost = Result(100, 10.0, accepted=100, latencies_s=[0.2] * 99)
    assert "**FAIL**" in report(lost, "cmd")
    plot(fast, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000
