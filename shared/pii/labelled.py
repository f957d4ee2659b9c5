"""Names and addresses, found only where a label announces them.

There is no offline model for free-running names ("I met 张三 yesterday") or addresses, so
these finders cover only text like ``姓名：张三``, ``收件人：欧阳娜娜``, ``我叫王小明``,
``Name: John Smith``, ``My name is Jane Doe``, ``地址：北京市朝阳区建国路88号`` and
``Address: 221B Baker Street, London``. They read the text after full-width forms are
mapped to ASCII (``：`` is ``:``), and return ``(start, end)`` spans.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from shared.pii.text import clause_before

_HAN = r"\u4e00-\u9fff"
# The most common single-character surnames and the compound ones, for unlabelled "我叫…".
_SURNAMES = frozenset(
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁"
    "任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付傅方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃武"
    "戴莫孔向汤常温康施文牛樊葛邢安齐易乔伍庞颜倪庄聂章鲁岳翟殷詹申欧耿关兰焦俞左柳甘祝包宁尚符舒阮柯"
    "纪梅童凌毕单季裴霍涂成苗谷盛曲翁冉骆蓝路游辛靳管柴蒙鲍华喻祁蒲房滕屈饶解牟艾尤阳时穆农司卓古吉"
)
_COMPOUND_SURNAMES = (
    *("欧阳", "司马", "上官", "诸葛", "东方", "皇甫", "尉迟", "公孙", "慕容", "令狐"),
    *("长孙", "宇文", "司徒", "夏侯", "轩辕", "端木", "独孤", "南宫", "西门", "呼延"),
)
# Words that end a Chinese name when no punctuation does: "张三先生", "李四电话…".
_NAME_STOPS = (
    *("先生", "女士", "小姐", "同学", "老师", "师傅", "电话", "手机", "性别", "年龄", "地址"),
    *("住址", "身份", "邮箱", "联系", "今年", "来自", "的", "是", "在", "和", "与", "已", "于"),
)
_ENGLISH_STOPS = frozenset(
    {"phone", "tel", "mobile", "email", "e-mail", "address", "id", "passport", "card"}
    | {"age", "gender", "date", "dob", "and", "from", "at", "the", "is"}
)
# "Name:" after these words names a thing, not a person.
_NOT_A_PERSON = (
    *("file", "host", "model", "product", "project", "service", "table", "column", "field"),
    *("variable", "domain", "server", "app", "package", "class", "function", "company"),
    *("brand", "device", "queue", "topic", "bucket", "文件", "产品", "项目", "公司", "型号"),
    *("模型", "服务", "设备", "品牌", "商品"),
)

_CHINESE_NAME_LABEL = re.compile(
    r"(?:真实姓名|客户姓名|姓名|名字|联系人|收件人|收货人|寄件人|持卡人|开户名|户主|患者|申请人|法定代表人)"
    r"\s*:\s*"
)
_CHINESE_NAME_INTRO = re.compile(r"(?:我叫|我的名字是|名叫|本人)\s*")
_ENGLISH_NAME_LABEL = re.compile(
    r"(?<![A-Za-z])(?:(?i:full name|customer name|patient name|contact name|account holder"
    r"|cardholder|recipient|name)\s*:\s*|(?i:my name is)\s+)"
)
_HAN_NAME = re.compile(rf"[{_HAN}]{{2,4}}(?:[·•][{_HAN}]{{2,10}})?")
_ENGLISH_NAME = re.compile(
    r"(?:(?:Mr|Mrs|Ms|Miss|Dr)\.? )?([A-Z][A-Za-z'’-]+(?: [A-Z][A-Za-z'’-]+){0,3})"
)

_CHINESE_ADDRESS_LABEL = re.compile(
    r"(?:家庭住址|收货地址|联系地址|通讯地址|户籍地址|居住地址|详细地址|现住址|住址|地址|居住地)\s*:\s*"
    r"|(?:居住在|住在|家住|住于)\s*"
)
_ENGLISH_ADDRESS_LABEL = re.compile(
    r"(?<![A-Za-z])(?:(?i:home address|shipping address|mailing address|billing address"
    r"|street address|address|addr)\s*:\s*|(?i:lives at|live at|living at|resides at)\s+)"
)
_ADDRESS_CHAR = r"[^\s,。;|!?、:()\[\]]"
_CHINESE_ADDRESS = re.compile(rf"{_ADDRESS_CHAR}(?:{_ADDRESS_CHAR}| (?={_ADDRESS_CHAR})){{3,59}}")
_CHINESE_ADDRESS_END = re.compile(
    r"\.\s|\s*(?:电话|手机|邮箱|邮编|姓名|联系|身份证|(?i:tel|phone|email))"
)
_ADDRESS_MARKERS = re.compile(r"[省市区县镇乡村路街道巷弄号楼室栋幢]")
_ENGLISH_ADDRESS = re.compile(r"[^\n;|]{5,120}")
_ENGLISH_ADDRESS_END = re.compile(
    r"\.\s|[" + _HAN + r"。]|\s(?i:phone|tel|mobile|email|e-mail|name|id|passport|and|but)\b"
)
# Lower-case words an English address may hold; any other one ends it ("… with his dog").
_ADDRESS_WORDS = frozenset(
    {"of", "the", "de", "la", "apt", "floor", "fl", "unit", "suite", "room", "rm", "no", "box"}
    | {"st", "rd", "ave", "street", "road", "avenue", "lane", "drive", "blvd", "bldg", "building"}
)
_HAS_LETTERS_AND_DIGIT = re.compile(r"(?=.*[0-9])(?=.*[A-Za-z]{2})")


def _names_a_thing(text: str, label_start: int) -> bool:
    before = clause_before(text, label_start, 12)
    return any(word in before for word in _NOT_A_PERSON)


Span = tuple[int, int]


def _han_name(text: str, start: int) -> Span | None:
    match = _HAN_NAME.match(text, start)
    if match is None:
        return None
    name = match.group()
    cut = next((i for i in range(2, len(name)) if name.startswith(_NAME_STOPS, i)), len(name))
    return start, start + cut


def _english_name(text: str, start: int) -> Span | None:
    """Capitalised words at ``start`` (after a title such as "Mr."), up to a stop word."""
    match = _ENGLISH_NAME.match(text, start)
    if match is None:
        return None
    name_start = end = match.start(1)
    for word in re.finditer(r"\S+", match.group(1)):
        if word.group().lower() in _ENGLISH_STOPS:
            break
        end = name_start + word.end()
    return (name_start, end) if end > name_start else None


def _surname_name(text: str, start: int) -> Span | None:
    """``<surname><1-2 given characters>`` at ``start``, for self-introductions."""
    surname = 2 if text.startswith(_COMPOUND_SURNAMES, start) else 1
    if surname == 1 and (start >= len(text) or text[start] not in _SURNAMES):
        return None
    name = _han_name(text, start)
    if name is None or name[1] - start <= surname:
        return None
    return start, min(name[1], start + surname + 2)


def names(text: str) -> Iterator[Span]:
    """Spans of person names that follow a name label or a self-introduction."""
    for label in (_CHINESE_NAME_LABEL, _ENGLISH_NAME_LABEL):
        for match in label.finditer(text):
            if _names_a_thing(text, match.start()):
                continue
            name = _han_name(text, match.end()) or _english_name(text, match.end())
            if name is not None:
                yield name
    for match in _CHINESE_NAME_INTRO.finditer(text):
        name = _surname_name(text, match.end())
        if name is not None:
            yield name


def _address_end(text: str, start: int) -> int | None:
    chinese = _CHINESE_ADDRESS.match(text, start)
    if chinese is not None:
        value = chinese.group()
        stop = _CHINESE_ADDRESS_END.search(value)
        value = value[: stop.start() if stop else len(value)]
        if len(value) >= 4 and _ADDRESS_MARKERS.search(value):
            return start + len(value)
    english = _ENGLISH_ADDRESS.match(text, start)
    if english is None:
        return None
    value = english.group()
    stop = _ENGLISH_ADDRESS_END.search(value)
    value = value[: stop.start() if stop else len(value)]
    end = 0
    for word in re.finditer(r"\S+", value):
        if word.group()[0].islower() and word.group().rstrip(".,").lower() not in _ADDRESS_WORDS:
            break
        end = word.end()
    value = value[:end].rstrip(" ,.")
    if _HAS_LETTERS_AND_DIGIT.match(value) and " " in value:
        return start + len(value)
    return None


def addresses(text: str) -> Iterator[Span]:
    """Spans of postal addresses that follow an address label."""
    for label in (_CHINESE_ADDRESS_LABEL, _ENGLISH_ADDRESS_LABEL):
        for match in label.finditer(text):
            end = _address_end(text, match.end())
            if end is not None:
                yield match.end(), end
