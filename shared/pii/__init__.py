"""PII desensitization: detect personal data in Chinese and English text and redact it.

    >>> from shared.pii import PiiPolicy, redact
    >>> redact("手机13812345678", PiiPolicy()).text
    '手机[PHONE:***5678]'

Covered, with the check that keeps decoys out:

- ``id_card``: 18-digit resident identity card numbers (also 6-8-4 with spaces or dashes):
  province code, a real birth date since 1900, and the GB 11643-1999 MOD 11-2 check digit.
- ``phone``: mainland mobile numbers, 11 digits in the allocated 13x-19x segments,
  optionally ``+86``/``0086``, spaced or dashed 3-4-4. Refused right after order words.
- ``bank_card``: 13-19 digits (plain or grouped by 4). Luhn-valid with a scheme prefix
  (UnionPay, Visa, Mastercard, Amex, JCB, Diners, Discover/Maestro, ICBC/ABC 955x);
  anything else only after a card word (银行卡, 卡号, card number).
- ``email``: ASCII addresses with a dotted domain.
- ``ip_address``: IPv4 with valid octets (not inside version strings such as 1.2.3.4.5 or
  after "version"), IPv6 validated by ``ipaddress``; loopback and unspecified are skipped.
- ``passport``: Chinese E/G + 8 digits and E + letter + 7 digits; any 6-9 character
  number right after "passport" or 护照.
- ``name`` and ``address``: only after a label (姓名：, 收件人：, 我叫…, Name:, My name is,
  地址：, 住在…, Address:); see :mod:`shared.pii.labelled`.

Not covered: names and addresses without a label (and English names written in lower
case), 15-digit first-generation ID cards, ID numbers grouped other than 6-8-4, landline and
non-Chinese phone numbers, Hong Kong/Macao/Taiwan identity cards and travel permits,
non-ASCII email addresses, licence plates, and PII split across strings or dict keys.

Known false positives: a four-part version after an unknown word ("numpy 1.26.4.0") reads
as an IPv4 address; a bare E/G + 8-digit code reads as a passport at score 0.8 (a policy's
``min_score`` of 0.85 asks for 护照/passport before it); any Luhn-valid number with a card
prefix and length reads as a card unless an order/tracking word precedes it.
"""

from shared.pii.detect import DEFAULT_MIN_SCORE, detect
from shared.pii.errors import PiiConfigError, PiiTokenError
from shared.pii.keys import PiiKey
from shared.pii.log_processor import PiiLogProcessor
from shared.pii.policy import PiiMode, PiiPolicy, Purpose
from shared.pii.redact import (
    RedactedData,
    RedactionResult,
    Redactor,
    mask,
    normalize,
    redact,
    redact_data,
    reveal,
)
from shared.pii.settings import PurposePolicies, TenantPiiSettings
from shared.pii.types import Finding, PiiType

__all__ = [
    "DEFAULT_MIN_SCORE",
    "Finding",
    "PiiConfigError",
    "PiiKey",
    "PiiLogProcessor",
    "PiiMode",
    "PiiPolicy",
    "PiiTokenError",
    "PiiType",
    "Purpose",
    "PurposePolicies",
    "RedactedData",
    "RedactionResult",
    "Redactor",
    "TenantPiiSettings",
    "detect",
    "mask",
    "normalize",
    "redact",
    "redact_data",
    "reveal",
]
