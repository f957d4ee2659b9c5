"""Redaction modes, keyed tokens per tenant, reversible tokens and nested structures."""

from __future__ import annotations

import re

import pytest

from shared.pii import (
    PiiConfigError,
    PiiKey,
    PiiMode,
    PiiPolicy,
    PiiTokenError,
    PiiType,
    Redactor,
    redact,
    redact_data,
    reveal,
)

SECRET = "tenant-secret-0123456789abcdef"
ID_CARD = "11010519491231002X"
TEXT = (
    f"张三的手机是+86 138-1234-5678，身份证{ID_CARD}，邮箱 Zhang.San@Example.com，"
    "login from 36.110.2.7, card 4111 1111 1111 1111"
)
RAW_VALUES = ["138-1234-5678", ID_CARD, "Zhang.San@Example.com", "36.110.2.7", "4111 1111 1111"]
TOKENIZE = PiiPolicy(default_mode=PiiMode.TOKENIZE)
REVERSIBLE = PiiPolicy(default_mode=PiiMode.TOKENIZE, reversible=True)


def key(tenant: str = "acme", secret: str = SECRET) -> PiiKey:
    return PiiKey(secret, tenant=tenant)


def assert_no_raw_values(text: str) -> None:
    for value in RAW_VALUES:
        assert value not in text


def test_mask_keeps_a_type_label_and_a_few_characters() -> None:
    result = redact(TEXT, PiiPolicy())
    assert result.text == (
        "张三的手机是[PHONE:***5678]，身份证[ID_CARD:***002X]，邮箱 [EMAIL:Z***@Example.com]，"
        "login from [IP_ADDRESS:36.110.*.*], card [BANK_CARD:***1111]"
    )
    assert result.counts == {
        PiiType.PHONE: 1,
        PiiType.ID_CARD: 1,
        PiiType.EMAIL: 1,
        PiiType.IP_ADDRESS: 1,
        PiiType.BANK_CARD: 1,
    }
    assert result.total == 5


def test_mask_visible_characters_are_configurable() -> None:
    assert redact("手机13812345678", PiiPolicy(mask_visible=0)).text == "手机[PHONE:***]"
    assert redact("手机13812345678", PiiPolicy(mask_visible=2)).text == "手机[PHONE:***78]"


def test_drop_leaves_only_the_type() -> None:
    result = redact(TEXT, PiiPolicy(default_mode=PiiMode.DROP))
    assert result.text == (
        "张三的手机是[PHONE]，身份证[ID_CARD]，邮箱 [EMAIL]，"
        "login from [IP_ADDRESS], card [BANK_CARD]"
    )


def test_modes_per_type_and_enabled_types() -> None:
    policy = PiiPolicy(
        types=frozenset({PiiType.PHONE, PiiType.EMAIL, PiiType.ID_CARD}),
        default_mode=PiiMode.MASK,
        modes={PiiType.EMAIL: PiiMode.DROP, PiiType.ID_CARD: PiiMode.TOKENIZE},
    )
    result = redact(TEXT, policy, key())
    assert "[PHONE:***5678]" in result.text
    assert "[EMAIL]" in result.text
    assert re.search(r"\[ID_CARD:tok_[0-9a-f]{20}\]", result.text)
    assert "36.110.2.7" in result.text  # IP addresses are not enabled
    assert "4111 1111 1111 1111" in result.text
    assert set(result.counts) == {PiiType.PHONE, PiiType.EMAIL, PiiType.ID_CARD}


def test_a_disabled_policy_passes_text_through() -> None:
    result = redact(TEXT, PiiPolicy(enabled=False))
    assert result.text == TEXT
    assert result.counts == {}


def test_tokens_are_deterministic_per_tenant_and_differ_across_tenants() -> None:
    acme = redact(TEXT, TOKENIZE, key("acme"))
    again = redact(TEXT, TOKENIZE, key("acme"))
    globex = redact(TEXT, TOKENIZE, key("globex"))
    other_secret = redact(TEXT, TOKENIZE, key("acme", "another-secret-0123456789"))
    assert_no_raw_values(acme.text)
    assert acme.text == again.text
    tokens = re.findall(r"tok_[0-9a-f]{20}", acme.text)
    assert len(tokens) == 5
    assert not set(tokens) & set(re.findall(r"tok_[0-9a-f]{20}", globex.text))
    assert not set(tokens) & set(re.findall(r"tok_[0-9a-f]{20}", other_secret.text))


def test_one_value_spelled_differently_gives_one_token() -> None:
    spellings = ["13812345678", "+86 138 1234 5678", "0086-13812345678", "１３８１２３４５６７８"]
    tokens = {redact(f"手机 {s}", TOKENIZE, key()).text for s in spellings}
    assert len(tokens) == 1
    emails = {redact(e, TOKENIZE, key()).text for e in ["A@Example.com", "a@example.com"]}
    assert len(emails) == 1


def test_the_same_digits_as_two_types_give_two_tokens() -> None:
    assert key().token(PiiType.PHONE, "13812345678") != key().token(
        PiiType.BANK_CARD, "13812345678"
    )


def test_reversible_tokens_round_trip_with_the_key_only() -> None:
    redacted = redact(TEXT, REVERSIBLE, key()).text
    assert_no_raw_values(redacted)
    assert redacted.count("enc_") == 5
    assert redacted == redact(TEXT, REVERSIBLE, key()).text  # deterministic
    revealed = reveal(redacted, key())
    # values come back normalized: digits only, lower-case email
    assert revealed == (
        f"张三的手机是13812345678，身份证{ID_CARD}，邮箱 zhang.san@example.com，"
        "login from 36.110.2.7, card 4111111111111111"
    )
    with pytest.raises(PiiTokenError):
        reveal(redacted, key("globex"))  # another tenant
    with pytest.raises(PiiTokenError):
        reveal(redacted, key("acme", "another-secret-0123456789"))  # another secret


def test_a_tampered_or_retyped_token_is_refused() -> None:
    redacted = redact("手机13812345678", REVERSIBLE, key()).text
    token = redacted.split("enc_")[1].rstrip("]")
    assert key().decrypt(PiiType.PHONE, token) == "13812345678"
    with pytest.raises(PiiTokenError):
        key().decrypt(PiiType.BANK_CARD, token)  # the type is authenticated
    flipped = ("A" if token[5] != "A" else "B").join([token[:5], token[6:]])
    with pytest.raises(PiiTokenError):
        key().decrypt(PiiType.PHONE, flipped)
    with pytest.raises(PiiTokenError):
        key().decrypt(PiiType.PHONE, "not base64!")


def test_keyed_hash_tokens_cannot_be_revealed() -> None:
    redacted = redact("手机13812345678", TOKENIZE, key()).text
    assert reveal(redacted, key()) == redacted
    digest = redacted.split("tok_")[1].rstrip("]")
    with pytest.raises(PiiTokenError):
        key().decrypt(PiiType.PHONE, digest)


def test_tokenizing_without_a_key_is_a_configuration_error() -> None:
    with pytest.raises(PiiConfigError, match="no key was given"):
        redact(TEXT, TOKENIZE)
    with pytest.raises(PiiConfigError, match="no key was given"):
        Redactor(PiiPolicy(modes={PiiType.PHONE: PiiMode.TOKENIZE}))
    Redactor(PiiPolicy(types=frozenset({PiiType.EMAIL}), modes={PiiType.PHONE: PiiMode.TOKENIZE}))


def test_a_short_secret_is_refused_and_a_key_never_shows_its_secret() -> None:
    with pytest.raises(PiiConfigError, match=r"pii\.keys\.acme: .* at least 16 bytes"):
        PiiKey("short", tenant="acme", setting="pii.keys.acme")
    assert SECRET not in repr(key())
    assert repr(key()) == "PiiKey(tenant='acme')"


def test_nested_structures_are_redacted_without_touching_the_original() -> None:
    record = {
        "request_id": "r-1",
        "messages": [
            {"role": "user", "content": "我的手机13812345678"},
            {"role": "assistant", "content": "好的，已记录邮箱 a@example.com"},
        ],
        "meta": {"ip": "36.110.2.7", "phone_number": 13912345678, "tokens": 42, "ok": True},
        "pair": ("ID", ID_CARD),
        "signature": "E12345678",
        "score": 0.5,
        "none": None,
    }
    result = redact_data(record, PiiPolicy(), skip_keys={"signature"})
    assert result.value == {
        "request_id": "r-1",
        "messages": [
            {"role": "user", "content": "我的手机[PHONE:***5678]"},
            {"role": "assistant", "content": "好的，已记录邮箱 [EMAIL:a***@example.com]"},
        ],
        "meta": {
            "ip": "[IP_ADDRESS:36.110.*.*]",
            "phone_number": "[PHONE:***5678]",
            "tokens": 42,
            "ok": True,
        },
        "pair": ("ID", "[ID_CARD:***002X]"),
        "signature": "E12345678",
        "score": 0.5,
        "none": None,
    }
    assert result.counts == {
        PiiType.PHONE: 2,
        PiiType.EMAIL: 1,
        PiiType.IP_ADDRESS: 1,
        PiiType.ID_CARD: 1,
    }
    assert record["messages"][0]["content"] == "我的手机13812345678"  # type: ignore[index]


def test_nested_structures_tokenize_consistently_with_flat_text() -> None:
    nested = redact_data({"a": ["手机13812345678"]}, TOKENIZE, key()).value
    assert nested == {"a": [redact("手机13812345678", TOKENIZE, key()).text]}


def test_reveal_can_leave_look_alike_tokens_in_place() -> None:
    redacted = redact("手机13812345678", REVERSIBLE, key()).text
    forged = redacted + " and [PHONE:enc_AAAAAAAAAAAAAAAAAAAAAAAAAAAA] [SSN:enc_AAAA]"
    with pytest.raises(PiiTokenError):
        reveal(forged, key())
    assert reveal(forged, key(), strict=False) == (
        "手机13812345678 and [PHONE:enc_AAAAAAAAAAAAAAAAAAAAAAAAAAAA] [SSN:enc_AAAA]"
    )
