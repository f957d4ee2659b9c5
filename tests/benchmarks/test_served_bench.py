"""The served benchmark's pure parts: percentiles, the targets' pass/fail logic, the results
file, the idle CPU accounting and the prompts. The benchmark itself is never run here."""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from meshbench import served_bench
from meshbench.served_results import (
    QUICK,
    Plan,
    Sample,
    SystemResult,
    Target,
    pct,
    ratio,
    render_markdown,
    targets,
)


def result(system: str, **figures: object) -> SystemResult:
    return SystemResult(system, **figures)  # type: ignore[arg-type]


def passing() -> dict[str, SystemResult]:
    return {
        "served": result(
            "served",
            decode_runs=[95.0, 100.0, 99.0],
            decode_tokens=[200, 200, 200],
            aggregate_tps={1: 90.0, 4: 200.0, 16: 300.0, 64: 310.0},
            one_token_ms=[20.0, 22.0, 25.0],
            idle_cpu_pct=2.0,
            requests=10,
        ),
        "engine": result("engine", decode_runs=[100.0], aggregate_tps={16: 320.0}),
        "llama-cpp": result("llama-cpp", decode_runs=[60.0], one_token_ms=[18.0, 19.0, 30.0]),
        "llama-server": result("llama-server", aggregate_tps={16: 150.0}),
    }


def test_percentiles_are_nearest_rank_and_none_when_empty() -> None:
    values = [float(v) for v in range(1, 101)]
    assert pct(values, 0.5) == 51.0  # rank round(0.5 * 99) = 50 (zero-based)
    assert pct(values, 0.99) == 99.0
    assert pct([7.0], 0.99) == 7.0
    assert pct([], 0.5) is None


def test_a_ratio_needs_both_figures() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None
    assert ratio(3.0, None) is None
    assert ratio(3.0, 0.0) is None


def test_targets_pass_at_the_threshold_and_fail_past_it() -> None:
    assert Target("x", 0.9, 0.9).verdict == "pass"
    assert Target("x", 0.89, 0.9).verdict == "FAIL"
    assert Target("x", 1.3, 1.3, at_most=True).verdict == "pass"
    assert Target("x", 1.31, 1.3, at_most=True).verdict == "FAIL"
    assert Target("x", None, 1.0).verdict == "not measured"


def test_the_served_targets_from_the_figures() -> None:
    goals = {t.label: t for t in targets(passing())}
    decode = goals["served batch-1 decode / engine in process"]
    assert decode.measured == pytest.approx(0.99)  # the median of the served runs
    assert goals["served batch-1 decode / llama-cpp-python"].measured == pytest.approx(99 / 60)
    assert goals["served one-token p50 / llama-cpp-python's"].measured == pytest.approx(22 / 19)
    assert goals["served 16 streams / engine in process"].measured == pytest.approx(300 / 320)
    assert goals["served 16 streams / llama-server (16 slots)"].measured == 2.0
    assert goals["idle mesh CPU"].measured == 2.0
    assert {t.verdict for t in goals.values()} == {"pass"}


def test_a_slow_or_missing_peer_fails_or_is_not_measured() -> None:
    figures = passing()
    figures["served"].idle_cpu_pct = 12.0
    del figures["llama-server"]
    verdicts = {t.label: t.verdict for t in targets(figures)}
    assert verdicts["idle mesh CPU"] == "FAIL"
    assert verdicts["served 16 streams / llama-server (16 slots)"] == "not measured"


def test_the_results_file_shows_the_figures_targets_and_failures() -> None:
    figures = passing()
    figures["served"].errors = 1
    figures["served"].error_examples = ["APIStatusError: 429"]
    figures["served"].idle_breakdown = {"broker": 0.5, "inference": 1.5}
    figures["served"].load_breakdown = {"inference": 150.25}  # the broker's reading missing
    failed = result("llama-server", failed="llama-server build failed: cmake exited 1")
    rows = [figures["served"], figures["engine"], figures["llama-cpp"], failed]
    text = render_markdown(rows, QUICK, "python -m meshbench.served_bench --quick", ["a line"])
    assert "`python -m meshbench.served_bench --quick`" in text
    assert "| meshllm served (gateway, openai client) | 99.0 (200) | 90.0 | 200.0 |" in text
    assert "| 1 / 10 |" in text
    assert "not measured: llama-server build failed: cmake exited 1" in text
    assert "| served 16 streams / llama-server (16 slots) | — | >= 1.5x | not measured |" in text
    assert "| idle mesh CPU | 2.00% of a core | <= 5% of a core | pass |" in text
    assert "| failed requests, all systems | 1 | <= 0 | FAIL |" in text
    assert "| inference | 1.50 | 150.2 |" in text
    assert "| broker | 0.50 | — |" in text
    assert "APIStatusError: 429" in text
    assert "- a line" in text


def test_a_result_survives_the_trip_from_a_worker_process() -> None:
    original = passing()["served"]
    again = SystemResult.from_json(json.loads(json.dumps(asdict(original))))
    assert again == original
    assert again.aggregate_tps[16] == 300.0


def test_the_plot_is_written(tmp_path: Path) -> None:
    from meshbench.served_results import plot

    path = tmp_path / "served.png"
    plot([*passing().values(), result("x", failed="no")], path)
    assert path.stat().st_size > 0


def test_idle_cpu_is_summed_per_process_group() -> None:
    # pid: (parent, ticks); 10 is `meshllm up`, 11 the broker, 12 a service that started 13
    # (as inference starts Ray); 99 is not the mesh's; 14 started during the window
    before = {10: (1, 100), 11: (10, 50), 12: (10, 20), 13: (12, 5), 99: (1, 7)}
    after = {10: (1, 110), 11: (10, 60), 12: (10, 30), 13: (12, 15), 14: (13, 10), 99: (1, 900)}
    roots = {10: "supervisor", 11: "broker", 12: "inference"}
    usage = served_bench.cpu_by_group(before, after, roots, seconds=10.0, ticks_per_s=100.0)
    assert usage == {"supervisor": 1.0, "broker": 1.0, "inference": 3.0}


def test_cold_prompts_are_unique_and_cached_ones_share_the_system_prompt() -> None:
    cold = [served_bench.cold_prompt(i)[-1]["content"] for i in range(50)]
    assert len(set(cold)) == 50
    assert len({text.split()[0] for text in cold}) > 1  # they differ from the first word on
    cached = [served_bench.cached_prompt(i) for i in range(3)]
    assert {m[0]["content"] for m in cached} == {served_bench.SYSTEM_PROMPT}
    assert len({m[1]["content"] for m in cached}) == 3


class BusyBackend:
    """A test double: each stream burns CPU in this process, then yields its tokens."""

    concurrency = (1, 16)

    async def stream(self, messages: served_bench.Messages, max_tokens: int) -> Sample:
        deadline = time.process_time() + 0.01
        while time.process_time() < deadline:
            pass
        await asyncio.sleep(0)
        return Sample(0.001, 0.002, max_tokens)

    async def one_token(self, messages: served_bench.Messages) -> float:
        return 0.001


async def test_the_load_phase_reads_cpu_by_process_group() -> None:
    plan = Plan(decode_tokens=4, decode_runs=1, stream_tokens=4, ttft_samples=1,
                one_token_samples=1)  # fmt: skip
    result = SystemResult("served")
    roots = {os.getpid(): "this process"}
    await served_bench.measure(BusyBackend(), plan, lambda *_: None, result, roots)
    assert set(result.load_breakdown) == {"this process"}
    assert result.load_breakdown["this process"] > 0  # 16 streams of 10 ms of CPU each
    assert result.aggregate_tps[16] > 0
    assert result.errors == 0
