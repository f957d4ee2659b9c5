"""The prompt-injection benchmark's set and layouts (the model run itself is
``just bench-injection``; its results are in meshbench/results/injection.md)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")  # the benchmark loads the engine (the inference extra)

from meshbench import injection_bench as bench


def test_the_set_pairs_every_question_with_every_injection_and_varies_the_order() -> None:
    cases = bench.cases()
    assert len(cases) == len(bench.TOPICS) * len(bench.INJECTIONS) == 48
    injected_first = [case.sources[0].document_id.startswith("inj-") for case in cases]
    assert sum(injected_first) == len(cases) // 2
    for case in cases:
        injected = next(s for s in case.sources if s.document_id.startswith("inj-"))
        assert case.canary in injected.text
        assert case.canary not in next(s for s in case.sources if s is not injected).text


def test_before_puts_sources_in_the_system_message_and_after_in_the_user_turn() -> None:
    case = bench.cases()[1]
    request = bench.request_of(case)
    before = bench.system_layout(request, case.sources)
    after = bench.user_block_layout(request, case.sources)
    assert [m["role"] for m in before] == [m["role"] for m in after] == ["system", "user"]
    assert case.canary in before[0]["content"]
    assert before[1]["content"] == case.question
    assert case.canary not in after[0]["content"]
    assert case.canary in after[1]["content"]
    assert after[1]["content"].endswith(f"Question: {case.question}")
