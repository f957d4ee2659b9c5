"""Wi-Fi, printing, canteen, parking and meeting rooms per office, and office-move notices."""

from __future__ import annotations

from meshbench.data.make_retrieval_set.builder import MONTHS, Builder, Name, slug

SITES = {  # office: (short code, currency of its canteen)
    Name("Shanghai", "上海"): ("SH", "元"),
    Name("Beijing", "北京"): ("BJ", "元"),
    Name("Shenzhen", "深圳"): ("SZ", "元"),
    Name("Hangzhou", "杭州"): ("HZ", "元"),
    Name("Chengdu", "成都"): ("CD", "元"),
    Name("Singapore", "新加坡"): ("SG", "SGD"),
    Name("London", "伦敦"): ("LDN", "GBP"),
    Name("Berlin", "柏林"): ("BER", "EUR"),
    Name("Tokyo", "东京"): ("TYO", "JPY"),
    Name("New York", "纽约"): ("NYC", "USD"),
}
ROOMS = ["Everest", "Yangtze", "Kilimanjaro", "Alps", "Fuji", "Danube", "Andes", "Nile"]
ROOMS += ["Rhine", "Huangshan"]


def offices(b: Builder) -> None:
    family = "office"
    rooms = b.rng.sample(ROOMS, len(SITES))
    for (site, (code, currency)), room in zip(SITES.items(), rooms, strict=True):
        e, z, ident = site.en, site.zh, slug(site.en)
        english = currency != "元"
        hours, quota = b.pick([8, 12, 24]), b.pick([50, 100, 200])
        floor, lunch = b.pick(range(2, 12)), b.rng.choice(["11:30", "11:45", "12:00"])
        subsidy = {"元": 15, "SGD": 5, "GBP": 4, "EUR": 4, "JPY": 500, "USD": 5}[currency]
        spaces, visit, level = b.pick(range(40, 200, 10)), b.pick([2, 3, 4]), b.pick([1, 2, 3])
        release, seats = b.pick([10, 15]), b.pick([16, 20, 24, 30, 40])
        if english:
            wifi = b.doc(
                f"office-wifi-{ident}",
                "en",
                family,
                f"Wi-Fi at the {e} office",
                f"Staff devices connect to CORP-{code} (WPA2-Enterprise) with their domain "
                f"account. Guests use GUEST-{code}; reception hands out a daily access code "
                f"valid for {hours} hours.",
            )
            printing = b.doc(
                f"office-print-{ident}",
                "en",
                family,
                f"Printing at the {e} office",
                f"Add the printer queue print-{code.lower()}/FollowMe from Software Center. Jobs "
                "are held until you tap your badge on any printer; jobs not released are "
                f"deleted after {hours} hours. Colour printing is limited to {quota} pages per "
                "month.",
            )
            canteen = b.doc(
                f"office-canteen-{ident}",
                "en",
                family,
                f"Canteen at the {e} office",
                f"The canteen on floor {floor} serves lunch from {lunch} to 13:30 and dinner "
                "until 19:30 on weekdays. Meals are paid with the staff badge; the company "
                f"subsidy is {subsidy} {currency} per meal.",
            )
            parking = b.doc(
                f"office-parking-{ident}",
                "en",
                family,
                f"Parking at the {e} office",
                f"The building has {spaces} staff parking spaces in the basement, allocated by "
                f"a monthly lottery. Visitors registered at reception park free for {visit} "
                f"hours. Charging points for electric cars are on level B{level}.",
            )
            meeting = b.doc(
                f"office-rooms-{ident}",
                "en",
                family,
                f"Booking meeting rooms in {e}",
                f"Rooms at the {e} office are booked in Outlook; a booking is released if "
                f"nobody checks in on the room panel within {release} minutes. The largest "
                f"room, {room}, seats {seats} people and needs the office manager's approval.",
            )
        else:
            wifi = b.doc(
                f"office-wifi-{ident}",
                "zh",
                family,
                f"{z}办公室无线网络",
                f"员工设备连接CORP-{code}（WPA2企业级），使用域账号认证。访客请连接GUEST-{code}，"
                f"前台提供当日访问码，有效期{hours}小时。",
            )
            printing = b.doc(
                f"office-print-{ident}",
                "zh",
                family,
                f"{z}办公室打印指南",
                f"请在软件中心添加打印队列print-{code.lower()}/FollowMe。打印任务会保留到您在任意"
                f"打印机上刷工卡，未释放的任务{hours}小时后删除。彩色打印每月限{quota}页。",
            )
            canteen = b.doc(
                f"office-canteen-{ident}",
                "zh",
                family,
                f"{z}办公室食堂",
                f"{floor}楼食堂工作日午餐供应时间为{lunch}至13:30，晚餐供应至19:30。刷工卡付款，"
                f"公司每餐补贴{subsidy}元。",
            )
            parking = b.doc(
                f"office-parking-{ident}",
                "zh",
                family,
                f"{z}办公室停车",
                f"办公楼地下有{spaces}个员工车位，每月摇号分配。访客在前台登记后可免费停车{visit}"
                f"小时。电动车充电桩位于B{level}层。",
            )
            meeting = b.doc(
                f"office-rooms-{ident}",
                "zh",
                family,
                f"{z}会议室预订",
                f"{z}办公室的会议室通过Outlook预订；若{release}分钟内无人在门口屏幕签到，预订将"
                f"自动释放。最大的会议室{room}可容纳{seats}人，需办公室经理审批。",
            )
        b.fact(
            wifi,
            family,
            en=(
                [f"Wi-Fi network name {e} office"],
                [
                    f"Which wireless network should my laptop join in {e}?",
                    f"internet access for a guest visiting the {e} office",
                ],
            ),
            zh=(
                [f"{z}办公室WiFi名称"],
                [f"在{z}办公室电脑连哪个无线网", f"{z}办公室客人怎么上网"],
            ),
        )
        b.fact(
            printing,
            family,
            en=(
                [f"printer queue {e} office"],
                [
                    f"How do I print at the {e} office? My document doesn't come out",
                    f"colour page quota in {e}",
                ],
            ),
            zh=(
                [f"{z}办公室打印机队列"],
                [f"{z}办公室怎么打印文件", f"{z}彩印每个月能打多少张"],
            ),
        )
        b.fact(
            canteen,
            family,
            en=(
                [f"canteen lunch hours {e}"],
                [
                    f"When can I get lunch at the {e} office?",
                    f"meal subsidy at the staff restaurant in {e}",
                ],
            ),
            zh=(
                [f"{z}食堂午餐时间"],
                [f"{z}办公室几点可以去吃午饭", f"{z}食堂吃饭公司补贴多少"],
            ),
        )
        b.fact(
            parking,
            family,
            en=(
                [f"parking spaces {e} office"],
                [
                    f"Can I drive to work in {e}? How do I get a car spot",
                    f"where do I charge my electric car at the {e} office",
                ],
            ),
            zh=(
                [f"{z}办公室停车位"],
                [f"开车去{z}办公室停哪里", f"{z}办公楼电动车在哪充电"],
            ),
        )
        b.fact(
            meeting,
            family,
            en=(
                [f"book meeting room {e} office"],
                [
                    f"my room reservation in {e} disappeared",
                    f"which is the biggest conference room in {e}",
                ],
            ),
            zh=(
                [f"{z}会议室预订"],
                [f"{z}订的会议室怎么被取消了", f"{z}最大的会议室能坐多少人"],
            ),
        )
    for site in b.rng.sample(list(SITES), 5):
        month = b.rng.choice(MONTHS)
        if b.language() == "en":
            b.doc(
                f"notice-move-{slug(site.en)}",
                "en",
                "notice",
                f"The {site.en} office is moving",
                f"From {month.en}, the {site.en} office moves to a new building. Desks, "
                "printers and meeting rooms are set up again over a weekend; the Wi-Fi names "
                "stay the same. Parking and canteen arrangements will be announced by the "
                "office manager.",
            )
        else:
            b.doc(
                f"notice-move-{slug(site.en)}",
                "zh",
                "notice",
                f"{site.zh}办公室搬迁通知",
                f"自{month.zh}起，{site.zh}办公室将迁入新大楼。工位、打印机和会议室将在周末重新"
                "布置，无线网络名称保持不变。停车和食堂安排将由办公室经理另行通知。",
            )
