"""How-tos about topics without an entity: a paraphrase shares few words with the document."""

from __future__ import annotations

from typing import NamedTuple

from meshbench.data.make_retrieval_set.builder import Builder, Name


class HowTo(NamedTuple):
    key: str
    family: str
    title: Name
    en_text: str
    zh_text: str
    en_queries: tuple[list[str], list[str]]  # lexical, paraphrase
    zh_queries: tuple[list[str], list[str]]


HOWTOS = [
    HowTo(
        "out-of-office",
        "it",
        Name("Automatic replies in Outlook", "设置Outlook自动回复"),
        "To set an out-of-office message, open Outlook, choose File > Automatic Replies, write "
        "the message and set the start and end dates. People outside the company get the "
        "reply only if you tick 'Outside my organization'.",
        "如需设置外出自动回复，请打开Outlook，选择“文件 > 自动答复”，填写回复内容并设置起止"
        "日期。只有勾选“组织外部”时，才会回复公司外部的发件人。",
        (
            ["set automatic replies in Outlook"],
            ["I'm going on holiday, how do I let people know I won't answer emails?"],
        ),
        (["Outlook设置自动回复"], ["休假期间怎么让别人知道我暂时不回邮件"]),
    ),
    HowTo(
        "calendar-sharing",
        "it",
        Name("Share your calendar", "共享日历"),
        "In Outlook, right-click your calendar and choose Sharing Permissions. Add a colleague "
        "and pick 'Can view when I'm busy' or 'Can view all details'; a delegate who books "
        "meetings for you needs 'Can edit'.",
        "在Outlook中右键单击日历，选择“共享权限”，添加同事并选择“可查看忙闲”或“可查看所有"
        "详细信息”；替您安排会议的代理人需要“可编辑”权限。",
        (
            ["share calendar permissions Outlook"],
            ["let my assistant see and organise my appointments"],
        ),
        (["Outlook共享日历权限"], ["怎么让助理帮我安排会议"]),
    ),
    HowTo(
        "room-screen",
        "it",
        Name("Video meetings in a meeting room", "在会议室开视频会议"),
        "Meeting rooms have a Teams panel on the table. Tap Join on the panel to start the "
        "meeting booked for the room; to show your laptop screen, plug in the HDMI cable or "
        "use the Share button in Teams.",
        "会议室桌上配有Teams控制面板。点击面板上的“加入”即可开始该会议室已预订的会议；如需"
        "投屏，请连接HDMI线或在Teams中点击共享。",
        (
            ["Teams panel meeting room share screen"],
            ["How do I put my laptop on the big display in the conference room?"],
        ),
        (["会议室Teams面板共享屏幕"], ["怎么把电脑画面投到会议室大屏上"]),
    ),
    HowTo(
        "software-request",
        "it",
        Name("Requesting software", "申请安装软件"),
        "Standard software is installed from Software Center without approval. Software that "
        "is not in the catalogue needs a request in the IT portal with a business reason; "
        "licences are charged to your cost centre.",
        "标准软件可直接在软件中心安装，无需审批。目录以外的软件须在IT门户提交申请并说明业务"
        "理由，许可证费用计入所在成本中心。",
        (
            ["request software not in the catalogue"],
            ["I need a program that isn't available on my laptop"],
        ),
        (["申请安装目录外软件"], ["想用的工具电脑上装不了怎么办"]),
    ),
    HowTo(
        "network-drive",
        "it",
        Name("Mapping a network drive", "映射网络共享盘"),
        "Open File Explorer, choose 'Map network drive', pick a letter and enter "
        "\\\\files\\<department>. Sign in with your domain account if asked. Access is "
        "granted by the folder owner.",
        "打开文件资源管理器，选择“映射网络驱动器”，选择盘符并输入\\\\files\\部门名称，如有"
        "提示请用域账号登录。访问权限由文件夹负责人授予。",
        (
            ["map network drive"],
            ["where are my team's shared folders and how do I open them"],
        ),
        (["映射网络驱动器"], ["部门的公共文件夹在哪里打开"]),
    ),
    HowTo(
        "password-manager",
        "it",
        Name("The password manager", "密码管理器"),
        "The company provides Keeper as its password manager. Keep work passwords there rather "
        "than in browsers or spreadsheets; passwords a team shares go into a shared folder "
        "managed by the team lead.",
        "公司提供Keeper密码管理器。请将工作密码保存在其中，不要存放在浏览器或表格里；团队共用的"
        "密码放在由组长管理的共享文件夹中。",
        (
            ["Keeper password manager"],
            ["safe place to keep the logins our team shares"],
        ),
        (["Keeper密码管理器"], ["团队共用的账号存在哪里比较安全"]),
    ),
    HowTo(
        "laptop-refresh",
        "it",
        Name("Getting a new laptop", "更换新电脑"),
        "Laptops are replaced every four years. When yours is due, IT sends an e-mail: book a "
        "handover slot, back up local files to OneDrive first, and bring the old laptop and its "
        "charger.",
        "笔记本电脑每四年更换一次。到期时IT会发邮件通知：请预约交接时间，提前把本地文件备份到"
        "OneDrive，并带上旧电脑和充电器。",
        (
            ["laptop replacement every four years"],
            ["My computer is old and slow, when do I get a new one?"],
        ),
        (["笔记本电脑更换周期"], ["电脑用了好几年很卡，什么时候能换"]),
    ),
    HowTo(
        "external-sharing",
        "it",
        Name("Sharing files with external partners", "与外部合作方共享文件"),
        "Share files with people outside the company from OneDrive with 'Specific people' "
        "links, which expire after 30 days. Do not attach Confidential files to e-mail; "
        "anonymous links are disabled.",
        "请通过OneDrive的“特定人员”链接与公司外部人员共享文件，链接30天后失效。机密文件不要作为"
        "邮件附件发送；匿名链接已禁用。",
        (
            ["share files with external partners OneDrive link"],
            ["how do I get a big document to a supplier"],
        ),
        (["OneDrive外部共享链接"], ["怎么把大文件发给供应商"]),
    ),
    HowTo(
        "mileage",
        "finance",
        Name("Mileage for private cars", "私车公用里程补贴"),
        "When you use your own car for business, claim 0.8 CNY per kilometre in ExpenseHub "
        "with the start and end addresses. Tolls and parking are reimbursed with receipts; "
        "fuel is not claimed separately.",
        "因公使用私家车时，可在费控系统中按每公里0.8元申报，并填写起止地址。过路费和停车费凭票"
        "报销；燃油费不再单独报销。",
        (
            ["mileage allowance private car per kilometre"],
            ["I drove my own car to a customer, what can I claim?"],
        ),
        (["私车公用里程补贴标准"], ["开自己的车去见客户能报销多少"]),
    ),
    HowTo(
        "corporate-card",
        "finance",
        Name("Corporate credit card", "公司信用卡"),
        "Employees who travel more than four times a year can apply for a corporate card in "
        "PeopleCenter. Statements must be reconciled in ExpenseHub within 30 days; personal "
        "purchases on the card are not allowed.",
        "每年出差超过四次的员工可在人事门户申请公司信用卡。账单须在30天内于费控系统中核销；"
        "不得用公司卡进行个人消费。",
        (
            ["apply for a corporate credit card"],
            ["Can I get a company card to pay for my trips?"],
        ),
        (["申请公司信用卡"], ["经常出差能不能办一张公司的卡"]),
    ),
    HowTo(
        "training",
        "hr",
        Name("Training budget", "培训预算"),
        "Each employee has a yearly learning budget of 5,000 CNY for courses, books and "
        "conferences. Get your manager's approval before you register; certificates are "
        "uploaded to PeopleCenter.",
        "每位员工每年有5000元学习预算，可用于课程、书籍和行业会议。报名前须经经理批准；证书请"
        "上传至人事门户。",
        (
            ["yearly training budget courses"],
            ["Will the company pay for an online class I want to take?"],
        ),
        (["年度培训预算"], ["想报个网课公司能出钱吗"]),
    ),
    HowTo(
        "referral",
        "hr",
        Name("Employee referral bonus", "内部推荐奖励"),
        "If someone you refer is hired and passes probation, you receive a referral bonus of "
        "8,000 CNY with the next salary. Submit the candidate's CV through the careers "
        "portal, not by e-mail to a recruiter.",
        "您推荐的候选人入职并通过试用期后，您将在下月工资中获得8000元内推奖金。请通过招聘门户"
        "提交候选人简历，不要直接发邮件给招聘专员。",
        (
            ["employee referral bonus"],
            ["I know someone perfect for an open job, do I get anything if they join?"],
        ),
        (["内部推荐奖金"], ["介绍朋友来公司上班有没有奖励"]),
    ),
    HowTo(
        "payday",
        "hr",
        Name("Pay day", "发薪日"),
        "Salaries are paid on the 10th of each month; when the 10th falls on a weekend or a "
        "public holiday, on the working day before. Payslips are published in PeopleCenter "
        "the same day.",
        "工资于每月10日发放；如遇周末或法定节假日，则提前至前一个工作日。工资单于当天在人事门户"
        "发布。",
        (
            ["salary payment date"],
            ["When does my pay arrive each month?"],
        ),
        (["工资发放日期"], ["每个月几号发工资"]),
    ),
    HowTo(
        "overtime",
        "hr",
        Name("Overtime and time off in lieu", "加班与调休"),
        "Overtime must be approved by your manager in advance. Weekend hours are compensated "
        "with time off in lieu within three months; work on public holidays is paid at three "
        "times the hourly rate.",
        "加班须事先经经理批准。周末加班可在三个月内安排调休；法定节假日加班按小时工资的三倍支付。",
        (
            ["overtime time off in lieu"],
            ["I worked on Saturday, do I get a day off for it?"],
        ),
        (["加班调休规定"], ["周末来公司干活了可以补休吗"]),
    ),
    HowTo(
        "probation",
        "hr",
        Name("Probation period", "试用期"),
        "New employees have a probation period of six months (three for fixed-term contracts "
        "shorter than a year). The manager holds a review meeting two weeks before it ends.",
        "新员工试用期为六个月（一年以内的固定期限合同为三个月）。试用期结束前两周，经理会安排"
        "评估面谈。",
        (
            ["probation period length"],
            ["How long until I'm a permanent employee after joining?"],
        ),
        (["试用期多长"], ["新员工多久才能转正"]),
    ),
    HowTo(
        "resignation",
        "hr",
        Name("Resigning and the notice period", "离职与通知期"),
        "To resign, submit your resignation in PeopleCenter. The notice period is 30 days, or "
        "3 days during probation. Return your laptop, badge and corporate card on the last "
        "day.",
        "如需离职，请在人事门户提交辞职申请。通知期为30天，试用期内为3天。最后一个工作日请归还"
        "电脑、工卡和公司信用卡。",
        (
            ["resignation notice period"],
            ["I want to quit, how long do I have to keep working?"],
        ),
        (["离职通知期"], ["提了辞职还要上多久班"]),
    ),
    HowTo(
        "health-check",
        "hr",
        Name("Annual health check", "年度体检"),
        "Every employee can have one free health check a year at a partner clinic. Book it in "
        "the benefits portal; family members can join at the corporate rate.",
        "每位员工每年可在合作体检机构免费体检一次。请在福利平台预约；家属可按企业价格参加。",
        (
            ["annual health check partner clinic"],
            ["Does the company pay for a medical check-up?"],
        ),
        (["年度体检预约"], ["公司每年有免费检查身体吗"]),
    ),
    HowTo(
        "lost-badge",
        "office",
        Name("Lost staff badge", "工卡丢失"),
        "Report a lost badge at reception or in the facilities portal at once so that it is "
        "blocked. A replacement costs 50 CNY, deducted from salary; a temporary badge is valid "
        "for one day.",
        "工卡丢失请立即到前台或在行政服务平台挂失。补办费用50元，从工资中扣除；临时卡当天有效。",
        (
            ["lost staff badge replacement"],
            ["my card for getting into the building is gone"],
        ),
        (["工卡丢失补办"], ["门禁卡找不到了怎么办"]),
    ),
    HowTo(
        "hot-desk",
        "office",
        Name("Booking a desk", "预订共享工位"),
        "Desks in open areas are booked in the Workspace app up to two weeks ahead. Check in by "
        "10:00 or the booking is released; leave the desk clear at the end of the day.",
        "开放区域的工位可在Workspace应用中提前两周预订。请在10:00前签到，否则预订将被释放；"
        "下班时请清理桌面。",
        (
            ["book a desk in the Workspace app"],
            ["reserve a place to sit before I come into the office"],
        ),
        (["Workspace预订工位"], ["去办公室之前怎么先订个座位"]),
    ),
    HowTo(
        "company-phone",
        "it",
        Name("Company mobile phones", "公司手机"),
        "Managers and field staff get a company phone with 20 GB of data a month. Roaming "
        "must be switched on in the IT portal before you travel abroad.",
        "经理和外勤员工配发公司手机，每月20GB流量。出国前须在IT门户开通国际漫游。",
        (
            ["company mobile phone roaming"],
            ["Will my work phone have internet on a trip overseas?"],
        ),
        (["公司手机国际漫游"], ["出国出差公司手机能不能上网"]),
    ),
    HowTo(
        "parcels",
        "office",
        Name("Sending parcels", "寄送快递"),
        "Business parcels go through the mailroom on the ground floor with the courier form "
        "and your cost centre. Private parcels may not be sent at the company's expense.",
        "公务快递请交到一楼收发室，填写快递单并注明成本中心。私人快递不得由公司付费寄送。",
        (
            ["send business parcels mailroom courier"],
            ["how do I mail a package to a customer"],
        ),
        (["收发室寄快递"], ["给客户寄东西找谁"]),
    ),
    HowTo(
        "gifts",
        "finance",
        Name("Gifts and hospitality", "礼品与款待"),
        "Gifts from customers or suppliers worth more than 300 CNY must be declared in the "
        "compliance portal within five days; cash gifts must always be refused.",
        "客户或供应商赠送的价值超过300元的礼品，须在五天内于合规平台申报；现金礼品一律拒收。",
        (
            ["declare gifts from suppliers"],
            ["A vendor sent me an expensive present, can I keep it?"],
        ),
        (["供应商礼品申报"], ["合作方送了我贵重东西能收吗"]),
    ),
    HowTo(
        "ergonomics",
        "office",
        Name("Ergonomic equipment", "人体工学设备"),
        "Employees can request a standing desk, an ergonomic chair or a vertical mouse in the "
        "facilities portal; a medical note speeds up the request.",
        "员工可在行政服务平台申请升降桌、人体工学椅或立式鼠标；附上医生证明可加快审批。",
        (
            ["request ergonomic chair standing desk"],
            ["My back hurts from sitting all day, can I get better furniture?"],
        ),
        (["申请人体工学椅升降桌"], ["久坐腰疼能换张好点的桌椅吗"]),
    ),
    HowTo(
        "it-hours",
        "it",
        Name("Contacting the IT service desk", "联系IT服务台"),
        "The IT service desk answers on extension 8000 and in the Teams channel IT Help from "
        "8:00 to 20:00 on weekdays. Outside these hours, call the on-call number for urgent "
        "outages only.",
        "IT服务台工作日8:00至20:00通过分机8000和Teams频道“IT Help”提供支持。其他时间仅限紧急"
        "故障拨打值班电话。",
        (
            ["IT service desk opening hours"],
            ["who do I call when my computer breaks late at night"],
        ),
        (["IT服务台服务时间"], ["晚上电脑坏了找谁"]),
    ),
]


def howtos(b: Builder) -> None:
    """Topics without an entity: a paraphrase shares few words with the document."""
    for howto in HOWTOS:
        language = b.language()
        title = howto.title.en if language == "en" else howto.title.zh
        text = howto.en_text if language == "en" else howto.zh_text
        doc = b.doc(f"howto-{howto.key}", language, howto.family, title, text)
        b.fact(doc, howto.family, en=howto.en_queries, zh=howto.zh_queries)
