"""The broker fetch-cost benchmark's report and plot, from measured-shaped points; and one
real measurement on the embedded broker at two sizes."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshbench.broker_fetch_cost import Point, measure, plot, report


def test_the_report_has_a_row_per_point_and_the_plot_is_drawn(tmp_path: Path) -> None:
    points = [Point(1, 500, 1.0, 1.5), Point(1, 8000, 4485.5, 5001.0, 0),
              Point(100, 8000, 0.5, 1.0)]  # fmt: skip
    text = report(points, "cmd")
    assert "| 1 | 8000 | 4485.5 | 5001.0 | 0 of 20 |" in text
    assert "| 100 | 8000 | 0.5 | 1.0 | 20 of 20 |" in text
    assert "No peer was run" in text
    plot(points, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000


@pytest.mark.kafka
async def test_a_measurement_on_the_embedded_broker(tmp_path: Path) -> None:
    points = await measure(1, [50, 100], tmp_path)
    assert [p.records for p in points] == [50, 100]
    assert all(p.cpu_ms_per_fetch >= 0 and p.wall_ms_per_fetch > 0 for p in points)
    assert [p.answered for p in points] == [20, 20]
