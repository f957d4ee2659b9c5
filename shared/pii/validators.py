"""Checksums and plausibility checks behind the structured detectors."""

from __future__ import annotations

from datetime import date

# GB/T 2260 province-level codes (the first two digits of an identity card number);
# 81/82/83 are the residence permits of Hong Kong, Macao and Taiwan residents.
PROVINCE_CODES = frozenset(
    {11, 12, 13, 14, 15, 21, 22, 23, 31, 32, 33, 34, 35, 36, 37}
    | {41, 42, 43, 44, 45, 46, 50, 51, 52, 53, 54, 61, 62, 63, 64, 65, 71, 81, 82, 83}
)
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK_CHARS = "10X98765432"
_EARLIEST_BIRTH_YEAR = 1900


def id_card_check_char(first17: str) -> str:
    """The GB 11643-1999 (ISO 7064 MOD 11-2) check character of 17 digits: 0-9 or X."""
    total = sum(int(digit) * weight for digit, weight in zip(first17, _ID_WEIGHTS, strict=True))
    return _ID_CHECK_CHARS[total % 11]


def is_valid_id_card(number: str, today: date | None = None) -> bool:
    """Whether ``number`` (18 characters, no separators) is a plausible resident ID number.

    Checks, cheapest first: the province code, a real birth date between 1900 and
    ``today``, and the check character (``x`` is accepted for ``X``).
    """
    if len(number) != 18 or not number[:17].isdigit():
        return False
    if int(number[:2]) not in PROVINCE_CODES:
        return False
    try:
        birth = date(int(number[6:10]), int(number[10:12]), int(number[12:14]))
    except ValueError:
        return False
    if not birth.year >= _EARLIEST_BIRTH_YEAR or birth > (today or date.today()):
        return False
    return id_card_check_char(number[:17]) == number[17].upper()


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) check every payment card number passes; False for non-digits."""
    if not (digits.isascii() and digits.isdigit()):
        return False
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


# (first digits low, high, lengths) of the issuer ranges of the big card schemes.
_CARD_SCHEMES: tuple[tuple[int, int, range], ...] = (
    (4, 4, range(13, 20, 3)),  # Visa: 13, 16, 19
    (51, 55, range(16, 17)),  # Mastercard
    (2221, 2720, range(16, 17)),  # Mastercard 2-series
    (34, 34, range(15, 16)),  # American Express
    (37, 37, range(15, 16)),
    (3528, 3589, range(16, 20)),  # JCB
    (30, 30, range(14, 20)),  # Diners Club
    (36, 36, range(14, 20)),
    (38, 39, range(16, 20)),
    (62, 62, range(16, 20)),  # UnionPay
    (60, 69, range(13, 20)),  # Discover, Maestro and other 6x issuers
    (50, 50, range(13, 20)),  # Maestro
    (56, 58, range(13, 20)),
    (9558, 9559, range(16, 20)),  # ICBC and ABC domestic cards
)


def has_card_prefix(digits: str) -> bool:
    """Whether ``digits`` starts like, and is as long as, a card of a big scheme.

    Visa, Mastercard, American Express, JCB, Diners Club, UnionPay, Discover, Maestro, and
    the old domestic cards of ICBC and ABC (9558, 9559). A Mastercard is always 16 digits,
    so an 18-digit number starting with 23 is not one.
    """
    return any(
        low <= int(digits[: len(str(low))]) <= high and len(digits) in lengths
        for low, high, lengths in _CARD_SCHEMES
    )
