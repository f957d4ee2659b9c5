"""Warranty and reset/firmware notes per device model, and the catalogues that only distract."""

from __future__ import annotations

from typing import NamedTuple

from meshbench.data.make_retrieval_set.builder import WEEKDAYS, Builder, Name, slug


class Category(NamedTuple):
    en: str
    en_plural: str
    zh: str


CATEGORIES = {
    "router": Category("router", "routers", "路由器"),
    "nas": Category("network storage box", "network storage boxes", "网络存储"),
    "printer": Category("printer", "printers", "打印机"),
    "camera": Category("conference camera", "conference cameras", "会议摄像头"),
    "dock": Category("docking station", "docking stations", "扩展坞"),
    "phone": Category("desk phone", "desk phones", "IP电话"),
    "badge": Category("badge reader", "badge readers", "门禁读卡器"),
    "headset": Category("headset", "headsets", "耳机"),
    "tablet": Category("tablet", "tablets", "平板电脑"),
    "speaker": Category("conference speaker", "conference speakers", "会议扬声器"),
    "ap": Category("wireless access point", "wireless access points", "无线接入点"),
    "monitor": Category("monitor", "monitors", "显示器"),
}
PRODUCTS = {  # brand: (category, model codes)
    "Nimbus": ("router", ["R200", "R300", "R500", "R700"]),
    "Atlas": ("nas", ["N2", "N4", "N8"]),
    "Orion": ("printer", ["P10", "P20", "P30", "P40"]),
    "Vega": ("camera", ["C1", "C3", "C5"]),
    "Lumen": ("dock", ["D2", "D4", "D6"]),
    "Helix": ("phone", ["H5", "H7", "H9"]),
    "Pulse": ("badge", ["B1", "B2", "B3"]),
    "Sonic": ("headset", ["S3", "S5", "S8"]),
    "Quartz": ("tablet", ["T8", "T10"]),
    "Echo": ("speaker", ["E3", "E5"]),
    "Zephyr": ("ap", ["Z4", "Z6", "Z8"]),
    "Prism": ("monitor", ["M24", "M27", "M32"]),
}
COLORS = [Name("orange", "橙色"), Name("blue", "蓝色"), Name("green", "绿色")]
COLORS += [Name("red", "红色"), Name("white", "白色"), Name("purple", "紫色")]
TOOLS = [Name("device admin page", "设备管理页面"), Name("IT Device Manager app", "IT设备管理应用")]
TOOLS += [Name("update button in the Company Portal", "公司门户中的更新按钮")]


def products(b: Builder) -> None:
    family = "product"
    for brand, (kind, models) in PRODUCTS.items():
        cat = CATEGORIES[kind]
        for model in models:
            name, ident = f"{brand} {model}", slug(model)
            months, swap = b.pick([12, 18, 24, 36]), b.pick([2, 3, 5])
            secs, color = b.pick([5, 10, 15, 20, 30]), b.rng.choice(COLORS)
            weekday, tool = b.rng.choice(WEEKDAYS), b.rng.choice(TOOLS)
            if b.language() == "en":
                warranty = b.doc(
                    f"product-{ident}-warranty",
                    "en",
                    family,
                    f"{name} {cat.en}: warranty and repairs",
                    f"The {name} {cat.en} is covered by a {months}-month warranty from the "
                    "delivery date. If it fails, open a ticket at the IT service desk with the "
                    f"asset tag; IT swaps the unit within {swap} working days. Accidental damage "
                    "is not covered, and repairs after the warranty are charged to your cost "
                    "centre.",
                )
            else:
                warranty = b.doc(
                    f"product-{ident}-warranty",
                    "zh",
                    family,
                    f"{name} {cat.zh}保修与维修",
                    f"{name} {cat.zh}自到货之日起保修{months}个月。设备故障请在IT服务台提交工单并"
                    f"注明资产编号，IT将在{swap}个工作日内更换。人为损坏不在保修范围内，过保维修"
                    "费用计入所在成本中心。",
                )
            if b.language() == "en":
                setup = b.doc(
                    f"product-{ident}-setup",
                    "en",
                    family,
                    f"{name} {cat.en}: reset and updates",
                    f"To restore the {name} to factory settings, hold the reset button for "
                    f"{secs} seconds until the status light blinks {color.en}. Firmware updates "
                    f"install automatically every {weekday.en} night; to update by hand, use the "
                    f"{tool.en}.",
                )
            else:
                setup = b.doc(
                    f"product-{ident}-setup",
                    "zh",
                    family,
                    f"{name} {cat.zh}恢复出厂设置与固件升级",
                    f"将{name}恢复出厂设置：按住复位键{secs}秒，直到状态灯闪烁{color.zh}。固件每"
                    f"{weekday.zh}晚上自动更新；如需手动升级，请使用{tool.zh}。",
                )
            b.fact(
                warranty,
                family,
                en=(
                    [f"{name} warranty period", f"{name} {cat.en} warranty and repairs"],
                    [
                        f"How long is the {model} covered if it breaks?",
                        f"My {name} stopped working, is it still under guarantee?",
                    ],
                ),
                zh=(
                    [f"{name}保修期", f"{name} {cat.zh}保修多久"],
                    [f"{model}坏了还在质保期内吗", f"{name}出故障了多久能换新的"],
                ),
            )
            b.fact(
                setup,
                family,
                en=(
                    [f"reset {name} to factory settings"],
                    [
                        f"How do I wipe the {model} back to its default configuration?",
                        f"{name} {cat.en} restore defaults button",
                    ],
                ),
                zh=(
                    [f"{name}恢复出厂设置"],
                    [f"{model}怎么重置成默认配置", f"{name}要按哪个键多久才能还原"],
                ),
            )
            b.fact(
                setup,
                family,
                en=(
                    [f"{name} firmware update"],
                    [
                        f"When does the {model} get new software?",
                        f"how to upgrade the {cat.en} software on the {name}",
                    ],
                ),
                zh=(
                    [f"{name}固件升级"],
                    [f"{model}的系统什么时候自动更新", f"{name}怎么手动升级软件"],
                ),
            )


def catalogues(b: Builder) -> None:
    """One per device category: names every model of it, answers nothing asked."""
    by_kind: dict[str, list[str]] = {}
    for brand, (kind, models) in PRODUCTS.items():
        by_kind.setdefault(kind, []).extend(f"{brand} {m}" for m in models)
    for kind, names in by_kind.items():
        cat, days = CATEGORIES[kind], b.pick([3, 5, 7, 10])
        if b.language() == "en":
            b.doc(
                f"catalogue-{kind}",
                "en",
                "notice",
                f"Standard {cat.en_plural} for offices",
                f"IT stocks the following {cat.en} models for desks and meeting rooms: "
                f"{', '.join(names)}. Order one from the IT catalogue; delivery takes {days} "
                "working days, and the old device must be returned to the IT desk.",
            )
        else:
            b.doc(
                f"catalogue-{kind}",
                "zh",
                "notice",
                f"办公室标准{cat.zh}型号",
                f"IT为工位和会议室备有以下{cat.zh}型号：{'、'.join(names)}。请在IT服务目录中下单，"
                f"{days}个工作日内送达，旧设备须交回IT服务台。",
            )
