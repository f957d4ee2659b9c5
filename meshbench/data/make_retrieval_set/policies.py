"""Security policies (in both languages), leave rules per country, remote work per
department and purchasing approval limits."""

from __future__ import annotations

from meshbench.data.make_retrieval_set.builder import MONTHS, WEEKDAYS, Builder, Name, slug


def security(b: Builder) -> None:
    """Ten policies, each written in both languages: two relevant documents per query."""
    family = "security"
    n, days, reuse = b.pick([10, 12, 14]), b.pick([60, 90, 180]), b.pick([5, 8, 10])
    hours, usb_days, visit_hours = b.pick([4, 8, 24]), b.pick([7, 14, 30]), b.pick([4, 12, 24])
    reply, lock, logs, mails = b.pick([1, 2, 4]), b.pick([5, 10, 15]), b.pick([90, 180]), 7
    policies = [
        (
            "password",
            "Password policy",
            f"Passwords for company accounts must be at least {n} characters long and include "
            "three of: upper case, lower case, digits, symbols. They expire every "
            f"{days} days, and the last {reuse} passwords cannot be reused.",
            "密码策略",
            f"公司账号密码长度至少{n}位，须包含大写字母、小写字母、数字、符号中的三类。密码每"
            f"{days}天过期，不得与最近{reuse}次使用过的密码相同。",
            (
                ["password policy minimum length"],
                [
                    "How often do I have to change my login password?",
                    "how many characters does my password need",
                ],
            ),
            (["密码策略最小长度"], ["电脑登录密码多久要换一次", "密码至少要设置几位"]),
        ),
        (
            "mfa",
            "Multi-factor authentication",
            "Multi-factor authentication (MFA) is mandatory for email, VPN and all cloud "
            "applications. Use the Authenticator app; SMS codes are allowed only as a backup. "
            "Report a lost phone so that the MFA registration can be reset.",
            "多因素认证",
            "邮箱、VPN及所有云应用必须启用多因素认证（MFA）。请使用Authenticator应用，短信验证码"
            "仅作为备用方式。手机丢失须及时报告，以便重置MFA绑定。",
            (
                ["is multi-factor authentication mandatory"],
                ["Do I need two-step verification to read my mail?"],
            ),
            (["多因素认证是否必须启用"], ["登录邮箱需要二次验证吗", "换了手机验证器怎么办"]),
        ),
        (
            "encryption",
            "Laptop encryption",
            "All laptops must use full-disk encryption (BitLocker on Windows, FileVault on "
            "macOS). A lost or stolen laptop must be reported to the security team within "
            f"{hours} hours.",
            "笔记本电脑加密",
            "所有笔记本电脑必须启用全盘加密（Windows使用BitLocker，macOS使用FileVault）。笔记本"
            f"丢失或被盗须在{hours}小时内报告安全团队。",
            (
                ["laptop full-disk encryption requirement"],
                ["My notebook was stolen, who do I tell and how fast?"],
            ),
            (["笔记本电脑全盘加密要求"], ["电脑被偷了要多久之内上报"]),
        ),
        (
            "usb",
            "Removable storage",
            "USB drives and other removable storage are blocked on company computers by "
            "default. Exceptions need a ticket approved by the security team and expire after "
            f"{usb_days} days.",
            "移动存储设备管理",
            "公司电脑默认禁止使用U盘等移动存储设备。如需例外，须提交工单经安全团队审批，有效期"
            f"{usb_days}天。",
            (
                ["USB drives removable storage blocked"],
                ["Can I copy files to a thumb drive at work?"],
            ),
            (["U盘移动存储设备禁用"], ["公司电脑能不能插优盘拷文件"]),
        ),
        (
            "classification",
            "Data classification",
            "Information is classified as Public, Internal, Confidential or Restricted. "
            "Confidential and Restricted data may only be shared with named people and must be "
            "encrypted when sent outside the company.",
            "数据分级",
            "公司信息分为公开、内部、机密、绝密四个级别。机密和绝密数据只能分享给指定人员，对外发送"
            "时必须加密。",
            (
                ["data classification levels confidential restricted"],
                ["What are the sensitivity categories for company information?"],
            ),
            (["数据分级 机密 绝密"], ["公司资料分成哪几个保密等级"]),
        ),
        (
            "visitors",
            "Visitor access",
            "Visitors sign in at reception, wear a visitor badge and are escorted by their host "
            "at all times. Badges are returned when leaving; hosts register visitors at least "
            f"{visit_hours} hours in advance.",
            "访客管理",
            "访客须在前台登记、佩戴访客证，并全程由接待人陪同。离开时归还访客证；接待人须至少提前"
            f"{visit_hours}小时登记访客信息。",
            (
                ["visitor badge registration at reception"],
                ["A client is coming to the office tomorrow, what do I need to do?"],
            ),
            (["访客登记 访客证"], ["有客户来公司拜访需要提前做什么"]),
        ),
        (
            "phishing",
            "Reporting phishing",
            "If an email looks suspicious, do not click its links or open its attachments. Use "
            "the Report Phishing button in Outlook; the security team replies within "
            f"{reply} hours.",
            "钓鱼邮件举报",
            "收到可疑邮件时，不要点击链接或打开附件。请使用Outlook中的“举报钓鱼”按钮，安全团队会在"
            f"{reply}小时内回复。",
            (
                ["report phishing email"],
                ["I got a strange mail asking for my password, what should I do?"],
            ),
            (["举报钓鱼邮件"], ["收到可疑邮件让我输密码怎么办"]),
        ),
        (
            "clean-desk",
            "Clean desk and screen lock",
            "Lock your screen whenever you leave your desk; screens lock automatically after "
            f"{lock} minutes. Paper documents marked Confidential must be locked away at the "
            "end of the day.",
            "桌面整洁与锁屏",
            f"离开座位时请锁定屏幕，屏幕会在{lock}分钟无操作后自动锁定。标注为机密的纸质文件下班前"
            "须锁入柜中。",
            (
                ["screen lock clean desk policy"],
                ["After how many minutes does my computer lock itself?"],
            ),
            (["锁屏 桌面整洁规定"], ["电脑不动几分钟会自动锁屏"]),
        ),
        (
            "byod",
            "Personal devices",
            "Company email and chat may be used on personal phones only through the managed "
            "Outlook and Teams apps. The company can wipe company data from the device, but "
            "never personal data.",
            "个人设备使用规定",
            "个人手机只能通过受管理的Outlook和Teams应用使用公司邮箱和聊天工具。公司可以远程清除"
            "设备上的公司数据，但不会删除个人数据。",
            (
                ["personal devices policy company email"],
                ["Is the company allowed to erase my private phone?"],
            ),
            (["个人设备使用规定 公司邮箱"], ["公司会不会删掉我手机里的私人数据"]),
        ),
        (
            "retention",
            "Data retention",
            f"System logs are kept for {logs} days, emails for {mails} years and contracts for "
            "ten years after they end. Deleting records under a legal hold is forbidden.",
            "数据保留期限",
            f"系统日志保留{logs}天，电子邮件保留{mails}年，合同在到期后保留十年。处于法律保全状态的"
            "记录禁止删除。",
            (
                ["data retention period emails logs"],
                ["How long does the company keep old emails?"],
            ),
            (["数据保留期限 邮件 日志"], ["公司的邮件会存多久才删"]),
        ),
    ]
    for key, title, text, title_zh, text_zh, en, zh in policies:
        ids = (
            b.doc(f"security-{key}-en", "en", family, title, text),
            b.doc(f"security-{key}-zh", "zh", family, title_zh, text_zh),
        )
        b.fact(ids, family, en=en, zh=zh)
    ids = (
        b.doc(
            "it-password-reset-en",
            "en",
            "it",
            "Reset a forgotten password",
            "If you forgot your password, go to the self-service portal, verify yourself with "
            "the MFA app and choose a new password. After five wrong attempts the account is "
            "locked for 30 minutes.",
        ),
        b.doc(
            "it-password-reset-zh",
            "zh",
            "it",
            "忘记密码如何重置",
            "忘记密码时，请访问自助服务门户，通过MFA应用验证身份后设置新密码。连续输错五次密码，"
            "账号将被锁定30分钟。",
        ),
    )
    b.fact(
        ids,
        "it",
        en=(
            ["reset forgotten password self-service"],
            ["I can't remember my login, how do I get back in?", "account locked after typos"],
        ),
        zh=(["忘记密码重置"], ["密码想不起来了怎么办", "输错密码账号被锁了"]),
    )


COUNTRIES = [Name("China", "中国"), Name("Singapore", "新加坡"), Name("the UK", "英国")]
COUNTRIES += [Name("Germany", "德国"), Name("Japan", "日本")]


def leave(b: Builder) -> None:
    family = "hr"
    for country in COUNTRIES:
        e, z, ident = country.en, country.zh, slug(country.en.removeprefix("the "))
        base, step, cap = b.pick([5, 10, 15, 20]), b.pick([1, 2, 3]), b.pick([20, 25, 30])
        month = b.rng.choice(MONTHS[2:7])
        sick, cert = b.pick([5, 10, 12, 15, 30]), b.pick([2, 3])
        wedding, within = b.pick([3, 5, 10]), b.pick([3, 6, 12])
        weeks, paternity, notice = b.pick([14, 16, 18, 26]), b.pick([5, 10, 15]), b.pick([4, 8])
        bereavement = b.pick([3, 5])
        rules = [
            (
                "annual",
                (
                    f"Annual leave in {e}",
                    f"Employees of our {e} entity receive {base} days of paid annual leave per "
                    f"calendar year, plus one extra day for every {step} years of service, up to "
                    f"{cap} days. Unused days can be carried over until the end of {month.en} of "
                    "the following year.",
                ),
                (
                    f"{z}公司年假规定",
                    f"{z}主体员工每个自然年享有{base}天带薪年假，每满{step}年工龄增加1天，最多"
                    f"{cap}天。未休年假可顺延至次年{month.zh}底。",
                ),
                (
                    [f"annual leave days {e}"],
                    [
                        f"How many vacation days do staff in {e} get each year?",
                        f"can I carry over unused holiday in {e}",
                    ],
                ),
                (
                    [f"{z}年假天数"],
                    [f"{z}员工一年有几天带薪休假", f"{z}没休完的年假能不能留到明年"],
                ),
            ),
            (
                "sick",
                (
                    f"Sick leave in {e}",
                    f"Staff in {e} may take up to {sick} days of paid sick leave per year. A "
                    f"medical certificate is required for absences longer than {cert} "
                    "consecutive days.",
                ),
                (
                    f"{z}病假规定",
                    f"{z}员工每年可享受最多{sick}天带薪病假，连续病休超过{cert}天须提供医院证明。",
                ),
                (
                    [f"paid sick leave {e}"],
                    [
                        f"How many days can I be off ill with pay in {e}?",
                        f"when do I need a doctor's note in {e}",
                    ],
                ),
                (
                    [f"{z}带薪病假天数"],
                    [f"{z}生病请假工资照发能请几天", f"{z}请病假什么时候要开医院证明"],
                ),
            ),
            (
                "marriage",
                (
                    f"Marriage leave in {e}",
                    f"Employees in {e} get {wedding} working days of paid marriage leave, to be "
                    f"taken within {within} months of the wedding.",
                ),
                (
                    f"{z}婚假规定",
                    f"{z}员工结婚可享受{wedding}个工作日带薪婚假，须在登记结婚后{within}个月内休完。",
                ),
                (
                    [f"marriage leave {e}"],
                    [f"How much time off do I get for my wedding in {e}?"],
                ),
                ([f"{z}婚假几天"], [f"在{z}结婚公司给放几天假"]),
            ),
            (
                "parental",
                (
                    f"Parental leave in {e}",
                    f"Birth parents in {e} receive {weeks} weeks of paid maternity leave; the "
                    f"other parent receives {paternity} days of paid paternity leave. Apply in "
                    f"PeopleCenter at least {notice} weeks before the expected date.",
                ),
                (
                    f"{z}产假与陪产假",
                    f"{z}员工生育可享受{weeks}周带薪产假，配偶可享受{paternity}天陪产假。请至少提前"
                    f"{notice}周在人事门户提交申请。",
                ),
                (
                    [f"maternity leave weeks {e}"],
                    [
                        f"how long is paid leave after having a baby in {e}",
                        f"paternity days for new fathers in {e}",
                    ],
                ),
                ([f"{z}产假多少周"], [f"{z}生孩子能休多久", f"{z}老公陪产假几天"]),
            ),
            (
                "bereavement",
                (
                    f"Bereavement leave in {e}",
                    f"In {e}, employees may take {bereavement} days of paid bereavement leave on "
                    "the death of a close family member (spouse, parent, child or sibling).",
                ),
                (
                    f"{z}丧假规定",
                    f"{z}员工直系亲属（配偶、父母、子女、兄弟姐妹）去世，可享受{bereavement}天带薪"
                    "丧假。",
                ),
                (
                    [f"bereavement leave {e}"],
                    [f"time off when a family member dies in {e}"],
                ),
                ([f"{z}丧假几天"], [f"{z}家里亲人去世可以请几天假"]),
            ),
        ]
        for key, english, chinese, en, zh in rules:
            language = b.language()
            title, text = english if language == "en" else chinese
            b.fact(b.doc(f"hr-{key}-{ident}", language, family, title, text), family, en=en, zh=zh)


DEPARTMENTS = [Name("Engineering", "研发部"), Name("Sales", "销售部"), Name("Marketing", "市场部")]
DEPARTMENTS += [Name("Finance", "财务部"), Name("Legal", "法务部"), Name("Design", "设计部")]
DEPARTMENTS += [Name("Customer Support", "客户支持部"), Name("Operations", "运营部")]
DEPARTMENTS += [Name("Procurement", "采购部"), Name("Human Resources", "人力资源部")]


def remote_work(b: Builder) -> None:
    family = "hr"
    for dept in DEPARTMENTS:
        days, start = b.pick([1, 2, 3]), b.pick([9, 10])
        end, day = b.pick([15, 16, 17]), b.rng.choice(WEEKDAYS[:5])
        if b.language() == "en":
            doc = b.doc(
                f"hr-remote-{slug(dept.en)}",
                "en",
                family,
                f"Remote work: {dept.en}",
                f"Members of the {dept.en} department may work from home up to {days} days a "
                f"week, agreed with their manager. Core hours are {start}:00 to {end}:00; "
                f"{day.en} is an office day for everyone in the team.",
            )
        else:
            doc = b.doc(
                f"hr-remote-{slug(dept.en)}",
                "zh",
                family,
                f"{dept.zh}远程办公规定",
                f"{dept.zh}员工经主管同意，每周最多可居家办公{days}天。核心工作时间为{start}:00至"
                f"{end}:00；每{day.zh}全员到岗。",
            )
        e, z = dept.en, dept.zh
        b.fact(
            doc,
            family,
            en=(
                [f"{e} work from home days per week"],
                [
                    f"How often can people in {e} work remotely?",
                    f"which day must the {e} team be in the office",
                ],
            ),
            zh=([f"{z}每周居家办公天数"], [f"{z}一周能在家上几天班", f"{z}哪天必须去公司"]),
        )


PURCHASES = [Name("software subscriptions", "软件订阅"), Name("laptops and hardware", "电脑及硬件")]
PURCHASES += [Name("consulting services", "咨询服务"), Name("marketing events", "市场活动")]
PURCHASES += [Name("office supplies", "办公用品"), Name("cloud services", "云服务")]


def procurement(b: Builder) -> None:
    family = "finance"
    for item in PURCHASES:
        low = b.pick([5000, 10000, 20000])
        high, quotes = low * b.pick([5, 10]), low * 2
        asked = high * 2
        if b.language() == "en":
            doc = b.doc(
                f"finance-approval-{slug(item.en)}",
                "en",
                family,
                f"Purchasing approval: {item.en}",
                f"Purchases of {item.en} up to {low} CNY are approved by the line manager, up to "
                f"{high} CNY by the department director; anything above needs the CFO. At least "
                f"three quotes are required above {quotes} CNY.",
            )
        else:
            doc = b.doc(
                f"finance-approval-{slug(item.en)}",
                "zh",
                family,
                f"{item.zh}采购审批权限",
                f"{item.zh}采购金额在{low}元以内由直属经理审批，{high}元以内由部门总监审批，超过"
                f"{high}元须CFO审批。金额超过{quotes}元需至少三家报价。",
            )
        b.fact(
            doc,
            family,
            en=(
                [f"approval limit for purchasing {item.en}"],
                [
                    f"Who has to sign off if I buy {item.en} worth {asked} yuan?",
                    f"how many quotes do I need for {item.en}",
                ],
            ),
            zh=(
                [f"{item.zh}采购审批权限"],
                [f"买{item.zh}花{asked}元要谁批", f"{item.zh}采购要几家报价"],
            ),
        )
