"""The instruments benchmark: every contender records, and the report has a row each."""

from __future__ import annotations

from meshbench.instruments_bench import cases, report


def test_every_contender_records_and_is_reported() -> None:
    found = cases()
    assert len(found) == 5
    for record_histogram, add_counter in found.values():
        record_histogram()
        add_counter()
    text = report([(name, 1.0, 2.0) for name in found], "cmd")
    assert text.count("| 1.00 | 2.00 |") == 5
