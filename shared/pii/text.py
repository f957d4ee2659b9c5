"""Text helpers shared by the detectors: full-width forms and the clause before a value."""

from __future__ import annotations

import re

_FULLWIDTH = str.maketrans(
    {chr(code): chr(code - 0xFEE0) for code in range(0xFF01, 0xFF5F)} | {"\u3000": " "}
)
# A full stop ends a clause, but not in "No. ", "Tel. ", "Num. " or "Nr. " before a number.
_CLAUSE_END = re.compile(r"[。;!?]|(?<!(?i:no))(?<!(?i:tel))(?<!(?i:num))(?<!(?i:nr))\.\s")


def to_halfwidth(text: str) -> str:
    """``text`` with full-width ASCII forms (``１３８``, ``：``) as ASCII; the length is kept."""
    return text.translate(_FULLWIDTH)


def clause_before(text: str, start: int, window: int) -> str:
    """Up to ``window`` characters before ``start``, lower-cased, from the current clause only.

    A keyword of the previous sentence ("银行卡号：…。记录1234…") says nothing about this one.
    """
    context = text[max(0, start - window) : start]
    ends = list(_CLAUSE_END.finditer(context))
    return (context[ends[-1].end() :] if ends else context).lower()
