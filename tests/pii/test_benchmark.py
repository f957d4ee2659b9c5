"""The PII benchmark's corpus, at a small size: the detectors meet their targets on it."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from meshbench import pii_bench
from shared.pii import PiiType
from shared.pii.types import STRUCTURED_TYPES


@pytest.fixture(scope="module")
def corpus() -> list[pii_bench.Sample]:
    return pii_bench.build_corpus(600, seed=7)


def test_the_corpus_is_deterministic_and_labels_real_spans(corpus: list[pii_bench.Sample]) -> None:
    again = pii_bench.build_corpus(600, seed=7)
    assert [s.text for s in again] == [s.text for s in corpus]
    assert [s.text for s in pii_bench.build_corpus(600, seed=8)] != [s.text for s in corpus]
    for sample in corpus:
        for span in sample.spans:
            assert 0 <= span.start < span.end <= len(sample.text)
    types = {span.type for sample in corpus for span in sample.spans}
    assert types == set(PiiType)
    assert {s.language for s in corpus} == {"zh", "en", "mixed"}
    assert {d.kind for s in corpus for d in s.decoys} == set(pii_bench.DECOYS)


def test_generated_values_pass_their_own_checks() -> None:
    rng = random.Random(1)
    assert pii_bench.id_check_char("11010519491231002") == "X"  # the GB 11643 example
    for _ in range(50):
        card = pii_bench.valid_bank_card(rng).replace(" ", "").replace("-", "")
        assert pii_bench.luhn_complete(card[:-1]) == card
        invalid = pii_bench.luhn_invalid(rng)
        assert pii_bench.luhn_complete(invalid[:-1]) != invalid
        number = pii_bench.valid_id_card(rng).replace(" ", "")
        assert pii_bench.id_check_char(number[:17]) == number[17]


def test_structured_types_meet_the_targets(corpus: list[pii_bench.Sample]) -> None:
    score = pii_bench.evaluate(corpus)
    for pii_type in STRUCTURED_TYPES:
        assert score.gold[pii_type] >= 30, pii_type
        assert score.recall(pii_type) >= pii_bench.RECALL_TARGET, pii_type
        assert score.precision(pii_type) >= pii_bench.PRECISION_TARGET, pii_type
    assert sum(score.flagged_decoys.values()) == 0, score.flagged_decoys


def test_the_corpus_has_teeth(corpus: list[pii_bench.Sample]) -> None:
    """The naive regexes fail on it: the decoys and CJK boundaries are real obstacles."""
    naive = pii_bench.evaluate(corpus, pii_bench.naive)
    assert naive.precision(PiiType.ID_CARD) < 0.8
    assert naive.recall(PiiType.PHONE) < 0.5  # \b sees no boundary in "手机138…"
    assert sum(naive.flagged_decoys.values()) > 100


def test_unlabelled_names_are_a_documented_gap() -> None:
    probe = pii_bench.evaluate(pii_bench.unlabelled_name_probe(50))
    assert probe.recall(PiiType.NAME) < 0.1


def test_a_run_writes_the_results_table(tmp_path: Path) -> None:
    report = pii_bench.run(sentences=150, seed=3, probe_size=20)
    path = pii_bench.write_results(tmp_path, report, ["--sentences", "150"], plotted=False)
    text = path.read_text(encoding="utf-8")
    assert "Command: `python -m meshbench.pii_bench --sentences 150`" in text
    assert "| id_card |" in text
    assert "MISSED" not in text
    assert "No plot: matplotlib is not installed" in text
    assert set(report.speeds) >= {"detect, one sentence a call", "redact, mask"}
    assert all(speed > 0 for speed in report.speeds.values())
