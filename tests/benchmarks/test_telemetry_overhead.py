"""The telemetry overhead benchmark's verdicts and plot, from measured-shaped rows."""

from __future__ import annotations

from pathlib import Path

from meshbench.mesh_bench import Sample, Stats
from meshbench.telemetry_overhead import Row, plot, report


def stats(requests: int, seconds: float) -> Stats:
    return Stats(samples=[Sample(0.01, 0.01)] * requests, wall_s=seconds)


def rows(on_rps: float) -> list[Row]:
    found = []
    for case in ("c=32, whole", "c=32, stream", "c=1, whole"):
        found.append(Row(case, "off", stats(1000, 10.0)))  # 100 requests/s
        found.append(Row(case, "on", stats(int(on_rps * 10), 10.0)))
    return found


def test_within_three_percent_passes_and_more_fails(tmp_path: Path) -> None:
    passed = report(rows(98.0), [2048, 2048], "cmd")
    assert "| c=32, whole | 0.980 | pass |" in passed
    assert "| c=1, whole | 0.980 | - |" in passed  # latency-bound: no verdict
    assert "scrapes during the run: 2, 2 KiB each" in passed
    failed = report(rows(96.0), [], "cmd")
    assert "| c=32, stream | 0.960 | FAIL |" in failed
    plot(rows(98.0), tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000
