"""Offline PII detection: validated patterns for structured values, labels for names and addresses.

Patterns are bounded by lookarounds on ASCII letters and digits rather than ``\\b``, because
``\\b`` sees no boundary between a CJK character and a digit (``手机13812345678``); ID, phone
and card numbers may also follow a word of letters (``ID110105…``), but not the middle of a
token such as a hex digest. Full-width digits and letters are read as their ASCII forms.

A candidate is scored from its checksum and the words just before it; candidates under
``min_score`` are dropped, and overlapping candidates keep the highest score. Names and
addresses are found only after a label (``姓名：``, ``Name:``, ``地址：``) and never over a
structured value.
"""

from __future__ import annotations

import bisect
import ipaddress
import re
from collections.abc import Callable, Collection, Iterator
from typing import NamedTuple

from shared.pii.labelled import addresses, names
from shared.pii.text import clause_before, to_halfwidth
from shared.pii.types import CONTEXTUAL_TYPES, Finding, PiiType
from shared.pii.validators import has_card_prefix, is_valid_id_card, luhn_valid

DEFAULT_MIN_SCORE = 0.5

_CONTEXT_WINDOW = 24  # characters before a value searched for a keyword
_NEGATIVE_WINDOW = 12  # negative keywords must be closer: "订单号：" sits right before its number


def _keywords(*words: str) -> re.Pattern[str]:
    return re.compile("|".join(re.escape(word) for word in words))


_ID_CONTEXT = _keywords("身份证", "证件号", "公民身份", "id card", "identity", "id no", "id number")
_PHONE_CONTEXT = _keywords(
    "手机", "电话", "联系方式", "致电", "微信", "mobile", "phone", "tel", "cell"
)
_CARD_CONTEXT = _keywords(
    *("银行卡", "卡号", "信用卡", "借记卡", "储蓄卡", "银行账号", "银行账户", "开户账号"),
    *("card number", "card no", "card #", "credit card", "debit card", "bank card"),
    *("bank account", "account number", "account no"),
)
_PASSPORT_CONTEXT = _keywords("护照", "passport", "travel document")
_NUMBER_NEGATIVE = _keywords(
    *("订单", "流水", "单号", "交易号", "运单", "快递", "发票", "型号", "序列号", "批次", "工单"),
    *("order", "tracking", "invoice", "sku", "serial", "batch", "ticket", "build", "model"),
)
_IP_NEGATIVE = _keywords("version", "版本", "ver.", "ver ", "build", "release", "firmware", "固件")

_NOT_ALNUM_BEFORE = r"(?<![0-9A-Za-z])"
_NOT_ALNUM_AFTER = r"(?![0-9A-Za-z])"
# Numbers may follow a word ("ID110105…", "tel13812345678"); _after_a_word checks which.
_NOT_DIGIT_BEFORE = r"(?<![0-9])"
_NOT_HEX_LETTER = re.compile(r"[G-Zg-z]")
_DIGIT = re.compile(r"[0-9]")
_ID_CARD = re.compile(
    _NOT_DIGIT_BEFORE
    + r"[1-9][0-9]{5}(?P<sep>[ -]?)[0-9]{8}(?P=sep)[0-9]{3}[0-9Xx]"
    + _NOT_ALNUM_AFTER
)
_PHONE = re.compile(
    _NOT_DIGIT_BEFORE
    + r"(?:(?:\+|00)86[ -]?|86[ -])?"
    + r"1(?:3[0-9]|4[5-9]|5[0-35-9]|6[2567]|7[0-8]|8[0-9]|9[0-35-9])"
    + r"(?P<sep>[ -]?)[0-9]{4}(?P=sep)[0-9]{4}"
    + _NOT_ALNUM_AFTER
)
_BANK_CARD = re.compile(
    _NOT_DIGIT_BEFORE
    + r"(?:[0-9]{13,19}"
    + r"|[0-9]{4}(?P<s>[ -])[0-9]{4}(?P=s)[0-9]{4}(?P=s)[0-9]{1,4}(?:(?P=s)[0-9]{1,3})?"
    + r"|[0-9]{4}(?P<t>[ -])[0-9]{6}(?P=t)[0-9]{4,5})"  # Amex and Diners: 4-6-5, 4-6-4
    + _NOT_ALNUM_AFTER
)
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24}"
    r"(?![A-Za-z0-9-])"
)
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(
    r"(?<![0-9A-Za-z.])" + _OCTET + r"(?:\." + _OCTET + r"){3}" + r"(?![0-9A-Za-z]|\.[0-9])"
)
_IPV6 = re.compile(
    r"(?<![0-9A-Za-z.])(?:[0-9A-Fa-f]{1,4}|(?=::))(?::[0-9A-Fa-f]{0,4}){2,7}"
    r"(?:(?<=:)" + _OCTET + r"(?:\." + _OCTET + r"){3})?"
    r"(?![0-9A-Za-z:]|\.[0-9])"
)
# Chinese passports: E or G and 8 digits, and since 2019 E, a letter (not I or O) and 7 digits.
_CN_PASSPORT = re.compile(
    _NOT_ALNUM_BEFORE + r"(?:[EG][0-9]{8}|E[A-HJ-NP-Z][0-9]{7})" + _NOT_ALNUM_AFTER
)
# Any country's passport number, but only right after the word "passport" or 护照.
_LABELLED_PASSPORT = re.compile(
    r"(?i:passport|护照)(?i:\s|[:#=.]|no|number|num|is|号码|号|为|是)*?"
    r"(?P<value>" + _NOT_ALNUM_BEFORE + r"(?=[A-Z0-9]*[0-9])[A-Z0-9]{6,9})" + _NOT_ALNUM_AFTER
)

_SCORE_ID_CARD = 0.95
_SCORE_PHONE = 0.85
_SCORE_CARD = 0.9
_SCORE_CARD_CONTEXT_ONLY = 0.75  # Luhn-invalid, or no scheme prefix, but labelled as a card
_SCORE_EMAIL = 0.95
_SCORE_IP = 0.9
_SCORE_CN_PASSPORT = 0.8
_SCORE_LABELLED_PASSPORT = 0.9
_SCORE_IN_CONTEXT = 0.99
_SCORE_REJECTED = 0.0
_SCORE_LABELLED = 0.8  # names and addresses


class _Candidate(NamedTuple):
    type: PiiType
    start: int
    end: int
    score: float


def _mentions(text: str, start: int, words: re.Pattern[str], window: int = _CONTEXT_WINDOW) -> bool:
    return words.search(clause_before(text, start, window)) is not None


def _after_a_word(text: str, start: int) -> bool:
    """Whether a number at ``start`` stands alone or right after a word of letters.

    ``ID110105…`` and ``tel13812345678`` count; a run of digits inside a token such as a
    hex digest (``3f2a1381…``, ``deadbeef1381…``) does not.
    """
    letters = start
    while letters > 0 and text[letters - 1].isascii() and text[letters - 1].isalpha():
        letters -= 1
    if letters == start:
        return True
    if letters > 0 and text[letters - 1].isascii() and text[letters - 1].isdigit():
        return False
    return _NOT_HEX_LETTER.search(text, letters, start) is not None


def _contextual_score(
    text: str,
    start: int,
    base: float,
    positive: re.Pattern[str],
    negative: re.Pattern[str] | None,
) -> float:
    if _mentions(text, start, positive):
        return _SCORE_IN_CONTEXT
    if negative is not None and _mentions(text, start, negative, _NEGATIVE_WINDOW):
        return _SCORE_REJECTED
    return base


def _id_cards(text: str) -> Iterator[_Candidate]:
    for match in _ID_CARD.finditer(text):
        if not _after_a_word(text, match.start()):
            continue
        number = match.group().replace(match["sep"], "") if match["sep"] else match.group()
        if is_valid_id_card(number):
            score = _contextual_score(text, match.start(), _SCORE_ID_CARD, _ID_CONTEXT, None)
            yield _Candidate(PiiType.ID_CARD, match.start(), match.end(), score)


def _phones(text: str) -> Iterator[_Candidate]:
    for match in _PHONE.finditer(text):
        if not _after_a_word(text, match.start()):
            continue
        score = _contextual_score(
            text, match.start(), _SCORE_PHONE, _PHONE_CONTEXT, _NUMBER_NEGATIVE
        )
        yield _Candidate(PiiType.PHONE, match.start(), match.end(), score)


def _bank_cards(text: str) -> Iterator[_Candidate]:
    for match in _BANK_CARD.finditer(text):
        if not _after_a_word(text, match.start()):
            continue
        digits = re.sub(r"[ -]", "", match.group())
        if not 13 <= len(digits) <= 19:
            continue
        if luhn_valid(digits) and has_card_prefix(digits):
            score = _contextual_score(
                text, match.start(), _SCORE_CARD, _CARD_CONTEXT, _NUMBER_NEGATIVE
            )
        elif _mentions(text, match.start(), _CARD_CONTEXT):
            score = _SCORE_CARD_CONTEXT_ONLY
        else:
            continue
        yield _Candidate(PiiType.BANK_CARD, match.start(), match.end(), score)


def _emails(text: str) -> Iterator[_Candidate]:
    if "@" not in text:
        return
    for match in _EMAIL.finditer(text):
        yield _Candidate(PiiType.EMAIL, match.start(), match.end(), _SCORE_EMAIL)


def _identifies_someone(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return not (address.is_loopback or address.is_unspecified)


def _ip_addresses(text: str) -> Iterator[_Candidate]:
    for match in _IPV4.finditer(text):
        if _mentions(text, match.start(), _IP_NEGATIVE, _NEGATIVE_WINDOW):
            continue
        if _identifies_someone(ipaddress.IPv4Address(match.group())):
            yield _Candidate(PiiType.IP_ADDRESS, match.start(), match.end(), _SCORE_IP)
    if "::" not in text and text.count(":") < 7:
        return
    for match in _IPV6.finditer(text):
        if not _DIGIT.search(match.group()):
            continue  # "dead::beef" is more likely a word game than an address
        try:
            address = ipaddress.IPv6Address(match.group())
        except ValueError:
            continue
        if _identifies_someone(address):
            yield _Candidate(PiiType.IP_ADDRESS, match.start(), match.end(), _SCORE_IP)


def _passports(text: str) -> Iterator[_Candidate]:
    for match in _CN_PASSPORT.finditer(text):
        score = _contextual_score(
            text, match.start(), _SCORE_CN_PASSPORT, _PASSPORT_CONTEXT, _NUMBER_NEGATIVE
        )
        yield _Candidate(PiiType.PASSPORT, match.start(), match.end(), score)
    for match in _LABELLED_PASSPORT.finditer(text):
        start, end = match.span("value")
        yield _Candidate(PiiType.PASSPORT, start, end, _SCORE_LABELLED_PASSPORT)


_STRUCTURED: tuple[Callable[[str], Iterator[_Candidate]], ...] = (
    _id_cards,
    _phones,
    _bank_cards,
    _emails,
    _ip_addresses,
    _passports,
)
# Ties go to the more specific type: an ID card number can also pass the Luhn check.
_PRIORITY = {
    PiiType.ID_CARD: 0,
    PiiType.PASSPORT: 1,
    PiiType.BANK_CARD: 2,
    PiiType.PHONE: 3,
    PiiType.EMAIL: 4,
    PiiType.IP_ADDRESS: 5,
    PiiType.ADDRESS: 6,
    PiiType.NAME: 7,
}


class _Taken:
    """Disjoint spans kept sorted by start, so that overlap checks are a bisection."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.candidates: list[_Candidate] = []

    def _before(self, position: int) -> int:
        """How many taken spans start before ``position``."""
        return bisect.bisect_left(self.starts, position)

    def overlaps(self, candidate: _Candidate) -> bool:
        index = self._before(candidate.end)
        return index > 0 and self.candidates[index - 1].end > candidate.start

    def add(self, candidate: _Candidate) -> None:
        index = self._before(candidate.start)
        self.starts.insert(index, candidate.start)
        self.candidates.insert(index, candidate)

    def clip(self, candidate: _Candidate, text: str) -> _Candidate | None:
        """``candidate`` cut short before the next taken span; None if it starts in one."""
        index = self._before(candidate.start + 1)
        if index > 0 and self.candidates[index - 1].end > candidate.start:
            return None
        end = candidate.end
        if index < len(self.starts):
            end = min(end, self.starts[index])
        while end > candidate.start and not text[end - 1].isalnum():
            end -= 1
        if end - candidate.start < 2:
            return None
        return candidate._replace(end=end)


def _resolve(candidates: list[_Candidate]) -> _Taken:
    taken = _Taken()
    ranked = sorted(candidates, key=lambda c: (-c.score, _PRIORITY[c.type], c.start - c.end))
    for candidate in ranked:
        if not taken.overlaps(candidate):
            taken.add(candidate)
    return taken


def detect(
    text: str, types: Collection[PiiType] | None = None, *, min_score: float = DEFAULT_MIN_SCORE
) -> list[Finding]:
    """Find PII in ``text``.

    Args:
        text: any text; Chinese, English or both.
        types: the types to report (all when None). Every structured detector still runs,
            so a disabled type cannot reappear as another (an ID card number as a bank card).
        min_score: candidates scored lower are not reported.

    Returns:
        Non-overlapping findings in text order, with ``text[f.start:f.end] == f.value``.
    """
    wanted = frozenset(PiiType) if types is None else frozenset(types)
    scan = to_halfwidth(text)
    candidates: list[_Candidate] = []
    if _DIGIT.search(scan):
        for detector in _STRUCTURED:
            candidates.extend(c for c in detector(scan) if c.score >= min_score)
    elif "@" in scan:
        candidates.extend(_emails(scan))
    taken = _resolve(candidates)
    if wanted & CONTEXTUAL_TYPES and min_score <= _SCORE_LABELLED:
        labelled = [
            _Candidate(pii_type, start, end, _SCORE_LABELLED)
            for pii_type, finder in ((PiiType.ADDRESS, addresses), (PiiType.NAME, names))
            if pii_type in wanted
            for start, end in finder(scan)
        ]
        for candidate in labelled:
            clipped = taken.clip(candidate, scan)
            if clipped is not None:
                taken.add(clipped)
    return [
        Finding(c.type, c.start, c.end, c.score, text[c.start : c.end])
        for c in taken.candidates
        if c.type in wanted
    ]
