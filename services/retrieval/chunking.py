"""Splitting a document's text into chunks for indexing and embedding.

Sizes are in *estimated model tokens* (:func:`estimate_tokens`), not characters, so one
limit fits English, Chinese and mixed text: multilingual-e5-small reads about 3.8
characters of English per token but only about 1.4 of Chinese. The default of 180 tokens
is about 650 characters of English or 240 of Chinese, well under the model's 512.

How text is cut, in order of preference:

1. between paragraphs (blank lines): a chunk that is at least half full ends at a
   paragraph break rather than taking the start of the next paragraph;
2. between sentences: after ``。！？；…`` (with any closing quote or bracket), after
   ``.!?`` followed by whitespace (not after common abbreviations, initials or list
   numbers), and at line breaks;
3. a sentence longer than the limit is cut between clauses (``，、,;:：``), then between
   words; only a single "word" longer than the limit (a URL, a hash) is cut inside.
   Between two Chinese characters is a word boundary here: splitting Chinese into words
   would need a dictionary, and this cut is rare (a 240-character sentence).

Overlap: when a chunk ends inside a paragraph because it is full, the next one starts
with the last whole sentences of it (up to ``overlap_tokens``), so a fact cut at the
boundary is still whole in one chunk. A chunk that ends at a paragraph break carries
nothing over. The result depends only on the text and the two sizes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_MAX_TOKENS = 180
DEFAULT_OVERLAP_TOKENS = 36
MODEL_MAX_TOKENS = 512

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af\u3000-\u303f\uff00-\uffef"
_CJK_CHARS = re.compile(f"[{_CJK}]")
_LETTERS = re.compile(rf"[^\W\d_{_CJK}]")
_DIGITS = re.compile(r"\d")
_SPACES = re.compile(r"\s")

_CLOSERS = "\"'”’」』）》】)\\]"
_SENTENCE_END = re.compile(
    rf"[。！？；…]+[{_CLOSERS}]*\s*"  # Chinese: no space needed after
    rf"|[.!?]+[{_CLOSERS}]*\s+"  # English: only before whitespace
    r"|\n\s*"
)
_CLAUSE_END = re.compile(r"[，、：,;:]+\s*")
_PIECES = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+\s*|\s+")
_NOT_AN_END = frozenset(
    (
        "mr",
        "mrs",
        "ms",
        "dr",
        "prof",
        "sr",
        "jr",
        "st",
        "vs",
        "e.g",
        "i.e",
        "cf",
        "fig",
        "nos",
        "vol",
        "pp",
        "approx",
        "dept",
        "inc",
        "ltd",
        "corp",
        "jan",
        "feb",
        "mar",
        "apr",
        "jun",
        "jul",
        "aug",
        "sep",
        "sept",
        "oct",
        "nov",
        "dec",
        "u.s",
        "u.k",
        "a.m",
        "p.m",
    )
)
_WORD_BEFORE = re.compile(r"(\S+?)[.!?]+[" + _CLOSERS + r"]*\s*\Z")


def estimate_tokens(text: str) -> int:
    """About how many multilingual-e5 tokens ``text`` is (rounded up, no special tokens).

    Calibrated on the model's tokenizer: Chinese/Japanese/Korean characters 0.75 each,
    other letters 0.28, digits 0.5, punctuation and symbols 0.6, whitespace 0.
    """
    return int(_cost(text) + 0.999)


def _cost(text: str) -> float:
    cjk = len(_CJK_CHARS.findall(text))
    letters = len(_LETTERS.findall(text))
    digits = len(_DIGITS.findall(text))
    spaces = len(_SPACES.findall(text))
    other = len(text) - cjk - letters - digits - spaces
    return 0.75 * cjk + 0.28 * letters + 0.5 * digits + 0.6 * other


@dataclass(frozen=True)
class _Unit:
    paragraph: int
    text: str  # with the whitespace that followed it in the source
    cost: float


def chunk_text(
    text: str,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    overlap_tokens: int = DEFAULT_OVERLAP_TOKENS,
) -> list[str]:
    """``text`` cut into chunks of at most ``max_tokens`` estimated tokens, in order.

    Args:
        text: plain text, paragraphs separated by blank lines (as
            :func:`services.retrieval.parsing.parse_document` gives it).
        max_tokens: the size limit of a chunk; at most 480, to stay under the model's
            512 tokens with its prefix and the estimate's error.
        overlap_tokens: at most this much of a full chunk's end starts the next one.

    Raises:
        ValueError: sizes out of range.
    """
    if not 0 < max_tokens <= MODEL_MAX_TOKENS - 32:
        raise ValueError(f"max_tokens must be in 1..{MODEL_MAX_TOKENS - 32}, got {max_tokens}")
    if not 0 <= overlap_tokens < max_tokens:
        raise ValueError(f"overlap_tokens must be in 0..{max_tokens - 1}, got {overlap_tokens}")
    chunks: list[str] = []
    current: list[_Unit] = []
    size = 0.0
    for unit in _units(text, max_tokens):
        if current and unit.paragraph != current[-1].paragraph and size >= max_tokens / 2:
            chunks.append(_join(current))
            current, size = [], 0.0
        if current and size + unit.cost > max_tokens:
            chunks.append(_join(current))
            same_paragraph = unit.paragraph == current[-1].paragraph
            current = _tail(current, overlap_tokens) if same_paragraph else []
            size = sum(u.cost for u in current)
            if size + unit.cost > max_tokens:
                current, size = [], 0.0
        current.append(unit)
        size += unit.cost
    if current:
        chunks.append(_join(current))
    return [chunk for chunk in chunks if chunk]


def split_sentences(paragraph: str) -> list[str]:
    """``paragraph`` cut after each sentence; the pieces (each with the whitespace that
    followed it) concatenate back to ``paragraph``."""
    pieces: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(paragraph):
        at_line_start = start == 0 or paragraph[start - 1] == "\n"
        if match.group()[0] in ".!?" and not _ends_sentence(
            paragraph[start : match.end()], at_line_start=at_line_start
        ):
            continue
        pieces.append(paragraph[start : match.end()])
        start = match.end()
    if start < len(paragraph):
        pieces.append(paragraph[start:])
    return pieces


def _ends_sentence(sentence: str, *, at_line_start: bool) -> bool:
    """Whether a ``.`` (``!``, ``?``) that ends ``sentence`` ends a sentence."""
    if sentence.rstrip()[-1:] in "!?":
        return True
    word = _WORD_BEFORE.search(sentence)
    if word is None:
        return True
    before = word.group(1).lstrip("(\"'“‘").lower()
    if before in _NOT_AN_END or (len(before) == 1 and before.isalpha()):
        return False  # an abbreviation or an initial: "e.g. this", "J. Smith"
    is_first_word = sentence[: word.start(1)].strip() == ""
    return not (is_first_word and at_line_start and before.isdigit() and len(before) <= 3)


def _units(text: str, max_tokens: int) -> list[_Unit]:
    units: list[_Unit] = []
    for number, paragraph in enumerate(re.split(r"\n[ \t]*\n\s*", text.strip())):
        for sentence in split_sentences(paragraph):
            if not sentence.strip():
                continue
            cost = _cost(sentence)
            if cost <= max_tokens:
                units.append(_Unit(number, sentence, cost))
            else:
                units.extend(
                    _Unit(number, piece, _cost(piece))
                    for piece in _split_long(sentence, max_tokens)
                )
    return units


def _split_long(sentence: str, max_tokens: int) -> list[str]:
    """A sentence over the limit, cut between clauses, else words, else characters."""
    clauses: list[str] = []
    start = 0
    for match in _CLAUSE_END.finditer(sentence):
        clauses.append(sentence[start : match.end()])
        start = match.end()
    clauses.append(sentence[start:])
    pieces: list[str] = []
    for clause in clauses:
        if _cost(clause) <= max_tokens:
            pieces.append(clause)
            continue
        for word in _PIECES.findall(clause):
            if _cost(word) <= max_tokens:
                pieces.append(word)
            else:
                pieces.extend(_hard_split(word, max_tokens))
    return _pack(pieces, max_tokens)


def _hard_split(word: str, max_tokens: int) -> list[str]:
    pieces: list[str] = []
    start = 0
    size = 0.0
    for index, char in enumerate(word):
        cost = _cost(char)
        if size + cost > max_tokens and index > start:
            pieces.append(word[start:index])
            start, size = index, 0.0
        size += cost
    pieces.append(word[start:])
    return pieces


def _pack(pieces: list[str], max_tokens: int) -> list[str]:
    packed: list[str] = []
    current = ""
    size = 0.0
    for piece in pieces:
        cost = _cost(piece)
        if current and size + cost > max_tokens:
            packed.append(current)
            current, size = "", 0.0
        current += piece
        size += cost
    if current:
        packed.append(current)
    return packed


def _tail(units: list[_Unit], budget: float) -> list[_Unit]:
    """The last whole units of ``units`` costing at most ``budget``, never all of them."""
    tail: list[_Unit] = []
    size = 0.0
    for unit in reversed(units[1:]):
        if size + unit.cost > budget:
            break
        tail.insert(0, unit)
        size += unit.cost
    return tail


def _join(units: list[_Unit]) -> str:
    parts: list[str] = []
    for index, unit in enumerate(units):
        if index and unit.paragraph != units[index - 1].paragraph:
            parts[-1] = parts[-1].rstrip()
            parts.append("\n\n")
        parts.append(unit.text)
    return "".join(parts).strip()
