"""Travel limits per city, and the hotel and relocation notices that only distract."""

from __future__ import annotations

from meshbench.data.make_retrieval_set.builder import MONTHS, Builder, Name, slug

DOMESTIC = [Name("Shanghai", "上海"), Name("Beijing", "北京"), Name("Shenzhen", "深圳")]
DOMESTIC += [Name("Guangzhou", "广州"), Name("Hangzhou", "杭州"), Name("Chengdu", "成都")]
DOMESTIC += [Name("Nanjing", "南京"), Name("Wuhan", "武汉")]
ABROAD = {  # city: (currency, rough price level against USD)
    Name("Singapore", "新加坡"): ("SGD", 1.3),
    Name("London", "伦敦"): ("GBP", 0.8),
    Name("Berlin", "柏林"): ("EUR", 0.9),
    Name("Tokyo", "东京"): ("JPY", 150.0),
    Name("New York", "纽约"): ("USD", 1.0),
    Name("Sydney", "悉尼"): ("AUD", 1.5),
    Name("Paris", "巴黎"): ("EUR", 0.95),
    Name("Dubai", "迪拜"): ("AED", 3.7),
}


def travel(b: Builder) -> None:
    family = "travel"
    for city in DOMESTIC + list(ABROAD):
        days, hours = b.pick([30, 45, 60, 90]), b.pick([4, 5, 6, 8])
        if city in ABROAD:
            currency, level = ABROAD[city]
            places = -2 if level > 100 else 0
            hotel = int(round(b.pick(range(180, 330, 10)) * level, places))
            meal = int(round(b.pick(range(50, 95, 5)) * level, places))
            doc = b.doc(
                f"travel-{slug(city.en)}",
                "en",
                family,
                f"Business travel to {city.en}: expense limits",
                f"For business trips to {city.en}, the hotel limit is {hotel} {currency} per "
                f"night including taxes. A meal allowance of {meal} {currency} per day is paid "
                f"without receipts. Submit the expense report in ExpenseHub within {days} days "
                "of returning; later claims need a director's approval. Business class may be "
                f"booked for flights longer than {hours} hours.",
            )
        else:
            hotel, meal = b.pick(range(450, 950, 50)), b.pick(range(100, 210, 10))
            doc = b.doc(
                f"travel-{slug(city.en)}",
                "zh",
                family,
                f"{city.zh}出差差旅标准",
                f"员工因公前往{city.zh}出差，住宿费用每晚上限为{hotel}元（含税）。伙食补贴按每天"
                f"{meal}元发放，无需提供发票。出差结束后须在{days}天内通过费控系统提交报销单，"
                f"逾期需部门总监审批。单程飞行时间超过{hours}小时的航班可申请商务舱。",
            )
        e, z = city.en, city.zh
        b.fact(
            doc,
            family,
            en=(
                [f"hotel limit per night for business trips to {e}"],
                [
                    f"How much can I spend on accommodation each night when I travel to {e}?",
                    f"maximum lodging cost per night on a work trip in {e}",
                ],
            ),
            zh=(
                [f"{z}出差住宿费用每晚上限"],
                [f"去{z}出差酒店一晚最多能报多少钱？", f"在{z}出差住宿标准是多少"],
            ),
        )
        b.fact(
            doc,
            family,
            en=(
                [f"meal allowance per day {e} business trip"],
                [f"What daily food per diem do I get on a work trip to {e}?"],
            ),
            zh=([f"{z}出差伙食补贴每天多少"], [f"到{z}出差吃饭每天补助多少钱"]),
        )
        b.fact(
            doc,
            family,
            en=(
                [f"deadline to submit the expense report after a trip to {e}"],
                [f"How many days do I have to file my {e} travel claim after I get back?"],
            ),
            zh=(
                [f"{z}出差结束后多少天内提交报销单"],
                [f"从{z}出差回来以后报销最晚什么时候交"],
            ),
        )
        b.fact(
            doc,
            family,
            en=(
                [f"when can I book business class flights to {e}"],
                [f"Am I allowed to fly business on a long flight to {e}?"],
            ),
            zh=([f"{z}出差什么情况下可以申请商务舱"], [f"飞{z}能不能坐公务舱"]),
        )


def travel_notices(b: Builder) -> None:
    """Hotel deals and relocation support: share a travel query's words, answer none."""
    cities = DOMESTIC + list(ABROAD)
    for city in b.rng.sample(cities, 8):
        month, brand = b.rng.choice(MONTHS), b.rng.choice(["Lotus", "Harbor", "Summit", "Meridian"])
        if b.language() == "en":
            b.doc(
                f"notice-hotel-{slug(city.en)}",
                "en",
                "notice",
                f"Corporate hotel rates in {city.en}",
                f"From {month.en} our travel agency offers negotiated corporate rates at {brand} "
                f"hotels in {city.en}, breakfast included. Book through the travel portal to get "
                "the rate; the nightly limit of the travel policy still applies, and the portal "
                "flags rooms above it.",
            )
        else:
            b.doc(
                f"notice-hotel-{slug(city.en)}",
                "zh",
                "notice",
                f"{city.zh}协议酒店上线",
                f"自{month.zh}起，差旅平台上线{city.zh}{brand}协议酒店，房价含早餐。请通过差旅平台"
                "预订以享受协议价；差旅标准中的每晚住宿上限仍然适用，超标房型会在平台上标出。",
            )
    for city in b.rng.sample(cities, 8):
        weeks = b.pick([2, 4, 6, 8])
        if b.language() == "en":
            b.doc(
                f"notice-relocation-{slug(city.en)}",
                "en",
                "notice",
                f"Relocating to the {city.en} office",
                f"Employees who transfer to the {city.en} office receive a one-time relocation "
                f"allowance of {b.pick(range(3000, 9000, 500))} USD, up to {weeks} weeks of "
                "temporary housing and a paid house-hunting trip. Ask HR for the relocation "
                "checklist before you book anything.",
            )
        else:
            b.doc(
                f"notice-relocation-{slug(city.en)}",
                "zh",
                "notice",
                f"调往{city.zh}办公室的搬迁支持",
                f"调往{city.zh}办公室的员工可获得一次性搬迁补贴{b.pick(range(20000, 60000, 5000))}"
                f"元、最长{weeks}周的临时住房以及一次带薪看房行程。预订前请先向HR索取搬迁清单。",
            )
