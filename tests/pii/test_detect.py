"""Detection: each type in Chinese, English and mixed text, and the decoys it must pass over."""

from __future__ import annotations

import pytest

from shared.pii import Finding, PiiType, detect
from shared.pii.validators import has_card_prefix, id_card_check_char, is_valid_id_card, luhn_valid

# The example of GB 11643-1999 itself, and two built with its check digit.
ID_CARD = "11010519491231002X"
ID_CARD_GANSU = "620102199003070069"  # starts like a UnionPay card
VISA = "4111111111111111"  # the classic Luhn-valid test number
UNIONPAY = "6222021234567890128"


def found(text: str, types: set[PiiType] | None = None) -> list[tuple[PiiType, str]]:
    return [(f.type, f.value) for f in detect(text, types)]


def test_reference_checksums() -> None:
    assert id_card_check_char(ID_CARD[:17]) == "X"
    assert is_valid_id_card(ID_CARD)
    assert is_valid_id_card(ID_CARD.lower())
    assert is_valid_id_card(ID_CARD_GANSU)
    assert not is_valid_id_card(ID_CARD[:17] + "1")  # check digit
    assert not is_valid_id_card("991005" + ID_CARD[6:])  # no province 99
    assert luhn_valid(VISA)
    assert luhn_valid(UNIONPAY)
    assert not luhn_valid(VISA[:-1] + "2")
    assert has_card_prefix(VISA)
    assert not has_card_prefix("4" * 18)  # Visa numbers are 13, 16 or 19 digits
    assert not has_card_prefix("2301" + "1" * 14)  # Mastercard 2-series is 16 digits


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"我的身份证号是{ID_CARD}。", [(PiiType.ID_CARD, ID_CARD)]),
        (f"ID card: {ID_CARD.lower()}, thanks", [(PiiType.ID_CARD, ID_CARD.lower())]),
        (f"用户ID{ID_CARD}已上传", [(PiiType.ID_CARD, ID_CARD)]),
        ("身份证 110105 19491231 002X", [(PiiType.ID_CARD, "110105 19491231 002X")]),
        (f"客户{ID_CARD_GANSU}已审核", [(PiiType.ID_CARD, ID_CARD_GANSU)]),
        ("手机13812345678", [(PiiType.PHONE, "13812345678")]),
        ("tel13812345678", [(PiiType.PHONE, "13812345678")]),
        ("Call +86 138-1234-5678 today", [(PiiType.PHONE, "+86 138-1234-5678")]),
        ("联系我0086 139 1234 5678谢谢", [(PiiType.PHONE, "0086 139 1234 5678")]),
        ("手机：１３８１２３４５６７８", [(PiiType.PHONE, "１３８１２３４５６７８")]),
        (f"卡号{UNIONPAY}", [(PiiType.BANK_CARD, UNIONPAY)]),
        ("pay with 4111 1111 1111 1111 now", [(PiiType.BANK_CARD, "4111 1111 1111 1111")]),
        ("Amex 3782 822463 10005", [(PiiType.BANK_CARD, "3782 822463 10005")]),
        ("银行卡号：6222021234567890123", [(PiiType.BANK_CARD, "6222021234567890123")]),
        ("邮箱zhang.san@example.com请回复", [(PiiType.EMAIL, "zhang.san@example.com")]),
        ("mail <a.b+tag@mail.corp.example.cn>.", [(PiiType.EMAIL, "a.b+tag@mail.corp.example.cn")]),
        ("登录IP为192.168.1.10的用户", [(PiiType.IP_ADDRESS, "192.168.1.10")]),
        ("from 8.8.8.8:53", [(PiiType.IP_ADDRESS, "8.8.8.8")]),
        ("client [2001:db8::8a2e:370:7334]:443", [(PiiType.IP_ADDRESS, "2001:db8::8a2e:370:7334")]),
        ("来自::ffff:10.0.0.1的请求", [(PiiType.IP_ADDRESS, "::ffff:10.0.0.1")]),
        ("护照号码：E12345678", [(PiiType.PASSPORT, "E12345678")]),
        ("我的护照EA1234567下个月到期", [(PiiType.PASSPORT, "EA1234567")]),
        ("Passport No. 123456789", [(PiiType.PASSPORT, "123456789")]),
        ("passport number is C01X00T47.", [(PiiType.PASSPORT, "C01X00T47")]),
    ],
)
def test_finds_each_structured_type(text: str, expected: list[tuple[PiiType, str]]) -> None:
    assert found(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        f"身份证号{ID_CARD[:17]}1",  # wrong check digit, even with the keyword
        "号码110105194913310027",  # month 13 (check digit computed for it)
        "号码110105208001010019",  # born in 2080
        "电话12345678901",  # not a mobile segment
        "号码15412345678",  # 154 is not allocated
        "编码1381234567890",  # a mobile number inside a longer one
        "订单号：6222021234567890128",  # Luhn-valid, but an order number
        "ref 4111111111111112",  # Luhn-invalid, no card word
        "record 1234567890123452",  # Luhn-valid, but no card scheme starts with 1
        "ts=1700000000000 and 20231120153045",  # timestamps
        "tracking SF1234567890123",
        "版本 1.2.3.4.5, v2.10.3.1 and version 4.3.2.1",
        "host 192.168.1.300",
        "MAC 00:1A:2B:3C:4D:5E at 12:30:45",
        "金额¥1,234,567.89",
        "request 3f2a9c1e-1234-5678-9abc-def012345678",
        "型号G12345678, SKU E12345678",  # product codes shaped like passports
        "localhost 127.0.0.1 and ::1",  # identify nobody
        "user@localhost",
        "sha 3f2a11010519491231002X",  # digits inside a hex digest
        "digest deadbeef13812345678",
        "token a1b13812345678",
    ],
)
def test_decoys_are_not_flagged(text: str) -> None:
    assert found(text) == []


def test_context_of_an_earlier_sentence_does_not_carry_over() -> None:
    text = f"银行卡号：{UNIONPAY}。记录6222021234567890123"
    assert found(text) == [(PiiType.BANK_CARD, UNIONPAY)]


def test_an_id_card_that_passes_luhn_is_an_id_card() -> None:
    assert luhn_valid(ID_CARD_GANSU)
    assert has_card_prefix(ID_CARD_GANSU)
    assert found(f"号码{ID_CARD_GANSU}") == [(PiiType.ID_CARD, ID_CARD_GANSU)]
    # a disabled type is not reported as another one
    assert found(f"号码{ID_CARD_GANSU}", {PiiType.BANK_CARD}) == []


def test_mixed_text_with_every_type_and_offsets() -> None:
    text = (
        f"姓名：张伟，身份证{ID_CARD}，手机+86 13912345678，email wei.zhang@qq.com，"
        f"card number {VISA}，IP 36.110.2.7，护照E12345678，地址：北京市朝阳区建国路88号"
    )
    findings = detect(text)
    assert [f.type for f in findings] == [
        PiiType.NAME,
        PiiType.ID_CARD,
        PiiType.PHONE,
        PiiType.EMAIL,
        PiiType.BANK_CARD,
        PiiType.IP_ADDRESS,
        PiiType.PASSPORT,
        PiiType.ADDRESS,
    ]
    assert all(text[f.start : f.end] == f.value for f in findings)
    assert findings[0].value == "张伟"
    assert findings[-1].value == "北京市朝阳区建国路88号"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("姓名：张三先生，电话见下", [(PiiType.NAME, "张三")]),
        ("收件人：欧阳娜娜", [(PiiType.NAME, "欧阳娜娜")]),
        ("我叫王小明今年20岁", [(PiiType.NAME, "王小明")]),
        (
            "Name: John Smith Phone: 13812345678",
            [(PiiType.NAME, "John Smith"), (PiiType.PHONE, "13812345678")],
        ),
        ("My name is Mary O'Brien.", [(PiiType.NAME, "Mary O'Brien")]),
        ("姓名: John Smith", [(PiiType.NAME, "John Smith")]),
        ("Name：李雷", [(PiiType.NAME, "李雷")]),
        (
            "地址：北京市 朝阳区 建国路88号 电话13812345678",
            [(PiiType.ADDRESS, "北京市 朝阳区 建国路88号"), (PiiType.PHONE, "13812345678")],
        ),
        ("家住杭州市西湖区文三路100号，邮编310000", [(PiiType.ADDRESS, "杭州市西湖区文三路100号")]),
        (
            "Address: 221B Baker Street, London NW1 6XE. Call me",
            [(PiiType.ADDRESS, "221B Baker Street, London NW1 6XE")],
        ),
        ("He lives at 12 Oak Avenue with his dog", [(PiiType.ADDRESS, "12 Oak Avenue")]),
    ],
)
def test_labelled_names_and_addresses(text: str, expected: list[tuple[PiiType, str]]) -> None:
    assert found(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "昨天张伟来办公室了",  # no label: not covered
        "file name: Report Final",
        "型号名字：旗舰版",
        "我是学生",
        "Address: see attached",
        "地址：见附件",
        "email address: nobody",
    ],
)
def test_no_name_or_address_without_a_person_label(text: str) -> None:
    assert [f for f in detect(text) if f.type in (PiiType.NAME, PiiType.ADDRESS)] == []


def test_address_label_before_an_email_yields_the_email_only() -> None:
    assert found("Email address: zhang@example.com") == [(PiiType.EMAIL, "zhang@example.com")]


def test_min_score_separates_bare_passport_shapes_from_labelled_ones() -> None:
    assert found("code G12345678") == [(PiiType.PASSPORT, "G12345678")]
    assert detect("code G12345678", min_score=0.85) == []
    assert [f.value for f in detect("护照G12345678", min_score=0.85)] == ["G12345678"]


def test_a_finding_does_not_show_its_value_in_repr() -> None:
    finding = detect("手机13812345678")[0]
    assert isinstance(finding, Finding)
    assert "13812345678" not in repr(finding)
    assert finding.value == "13812345678"
