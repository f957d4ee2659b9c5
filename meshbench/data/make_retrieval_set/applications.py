"""Error codes of five internal applications, their overviews and maintenance notices, and
VPN and e-mail set-up per operating system."""

from __future__ import annotations

from typing import NamedTuple

from meshbench.data.make_retrieval_set.builder import Builder, Name


class ErrorCause(NamedTuple):
    cause: Name  # "... shows error X when <cause.en>" / "当<cause.zh>时"
    fix: Name
    symptom: Name  # how a user would describe it, without the code


class App(NamedTuple):
    name: Name
    prefix: str
    about: Name
    causes: list[ErrorCause]


def cause(*texts: str) -> ErrorCause:
    """From (cause, its Chinese, fix, its Chinese, symptom, its Chinese)."""
    cause, cause_zh, fix, fix_zh, symptom, symptom_zh = texts
    return ErrorCause(Name(cause, cause_zh), Name(fix, fix_zh), Name(symptom, symptom_zh))


APPS = [
    App(
        Name("ExpenseHub", "费控系统"),
        "EXP",
        Name(
            "ExpenseHub is the expense reporting system: submit travel and business expenses "
            "with photos of the receipts; reports go to your manager and then to finance.",
            "费控系统用于提交差旅及业务费用报销：上传票据照片后，报销单先由经理审批，再交财务审核。",
        ),
        [
            cause(
                "the receipt date is outside the claim window",
                "发票日期超出可报销期限",
                "ask your director to approve a late claim",
                "请部门总监审批逾期报销",
                "ExpenseHub rejects my receipt because it is too old",
                "费控系统说我的票据太久了不能报",
            ),
            cause(
                "the same invoice number has already been claimed",
                "该发票号码已被报销过",
                "check your earlier reports for a duplicate",
                "请检查以往报销单是否重复提交",
                "ExpenseHub says I already submitted this invoice",
                "费控系统提示这张发票重复了",
            ),
            cause(
                "the cost centre on the report has been closed",
                "报销单上的成本中心已关闭",
                "choose the new cost centre from your department's list",
                "请从部门列表中选择新的成本中心",
                "my department's budget code is no longer accepted in ExpenseHub",
                "费控系统里部门的成本中心选不了了",
            ),
            cause(
                "an amount exceeds the travel policy limit",
                "报销金额超过差旅标准",
                "attach a written explanation approved by your manager",
                "请附上经经理批准的书面说明",
                "I spent more than allowed on a trip and ExpenseHub blocks the claim",
                "出差花超了，费控系统不让提交",
            ),
            cause(
                "the currency of the receipt is not supported",
                "票据币种不受支持",
                "convert the amount at the finance rate and enter it in CNY",
                "请按财务汇率折算成人民币后填写",
                "ExpenseHub won't take a receipt in a foreign currency",
                "外币发票在费控系统里录不进去",
            ),
            cause(
                "your bank account has not been verified",
                "收款银行账户尚未验证",
                "confirm the test deposit in PeopleCenter",
                "请在人事门户确认验证打款",
                "why can't ExpenseHub pay me back to my bank card",
                "费控系统报销款打不到我的银行卡",
            ),
            cause(
                "the receipt photo cannot be read",
                "票据照片无法识别",
                "take a new photo in good light",
                "请在光线充足处重新拍摄",
                "ExpenseHub can't read the picture of my taxi receipt",
                "费控系统识别不了我拍的出租车票",
            ),
            cause(
                "a customer trip has no project code",
                "客户差旅报销单缺少项目编号",
                "add the project code from the CRM",
                "请填写CRM中的项目编号",
                "ExpenseHub asks which project my client visit belongs to",
                "费控系统让我填拜访客户的项目号",
            ),
        ],
    ),
    App(
        Name("PeopleCenter", "人事门户"),
        "HR",
        Name(
            "PeopleCenter is the HR portal: leave requests, payslips, personal data and tax "
            "forms. Your line manager approves requests there.",
            "人事门户用于请假申请、查看工资单、维护个人信息和个税表单，申请由直属上级在门户中审批。",
        ),
        [
            cause(
                "your leave balance is not enough for the request",
                "假期余额不足以提交本次申请",
                "check your balance or choose unpaid leave",
                "请查询余额或改为事假",
                "PeopleCenter won't let me book vacation, says I don't have enough days",
                "人事门户请假提交不了，说我天数不够",
            ),
            cause(
                "the requested dates overlap an existing leave request",
                "申请日期与已有的请假记录重叠",
                "cancel or edit the earlier request first",
                "请先撤回或修改之前的申请",
                "error booking time off for days I already asked for",
                "请假时提示和之前申请的日子冲突",
            ),
            cause(
                "no line manager is assigned to your profile",
                "您的档案中没有设置直属上级",
                "ask your HR business partner to update the reporting line",
                "请联系HRBP更新汇报关系",
                "my requests in PeopleCenter have nobody to approve them",
                "人事门户里我的申请没有审批人",
            ),
            cause(
                "the payslip for that month has not been published yet",
                "该月工资单尚未发布",
                "wait until payday; payslips appear on the 10th",
                "请等待发薪日，工资单于每月10日发布",
                "I can't open this month's salary statement",
                "这个月的工资条打不开",
            ),
            cause(
                "your identity document on file has expired",
                "档案中的身份证件已过期",
                "upload the renewed passport or ID card",
                "请上传新的护照或身份证",
                "PeopleCenter says my passport on record is out of date",
                "人事门户提示我的证件过期了",
            ),
            cause(
                "the tax declaration form is locked for the year-end payroll run",
                "年终薪资结算期间个税申报表已锁定",
                "try again after the payroll run completes",
                "请在薪资结算完成后重试",
                "can't change my tax deductions in PeopleCenter in December",
                "年底改不了个税专项扣除",
            ),
            cause(
                "a change of bank details is waiting for verification",
                "银行卡信息变更正在等待核验",
                "wait two working days for payroll to verify it",
                "请等待薪资组在两个工作日内核验",
                "I updated my salary account but PeopleCenter still shows the old one",
                "改了工资卡，人事门户还显示旧卡",
            ),
            cause(
                "no emergency contact is on file",
                "未填写紧急联系人",
                "add one under Personal Data",
                "请在个人信息中补充",
                "PeopleCenter keeps asking who to call if something happens to me",
                "人事门户一直提示要填出事时联系谁",
            ),
        ],
    ),
    App(
        Name("SecureLink VPN", "SecureLink VPN客户端"),
        "VPN",
        Name(
            "SecureLink is the VPN client that connects laptops and phones to the company "
            "network from home or while travelling.",
            "SecureLink是公司的VPN客户端，用于在家或出差时将电脑和手机接入公司内网。",
        ),
        [
            cause(
                "the device certificate has expired",
                "设备证书已过期",
                "renew it in the Company Portal app",
                "请在公司门户应用中续期",
                "VPN stopped working, something about a certificate",
                "VPN连不上，提示证书有问题",
            ),
            cause(
                "the MFA prompt was not approved within 60 seconds",
                "多因素认证请求未在60秒内确认",
                "reconnect and approve the push notification promptly",
                "请重新连接并及时确认推送通知",
                "VPN login times out while waiting for my phone approval",
                "VPN登录时手机验证超时",
            ),
            cause(
                "you are already connected from the maximum of three devices",
                "已有三台设备同时连接，达到上限",
                "disconnect one of your other devices",
                "请断开其他设备的连接",
                "VPN refuses to connect because I'm signed in on my other laptop",
                "另一台电脑登着VPN，这台就连不上",
            ),
            cause(
                "the operating system version is no longer supported",
                "操作系统版本过低不再受支持",
                "install the latest system updates",
                "请安装最新的系统更新",
                "VPN says my computer is too out of date",
                "VPN提示我的系统太旧",
            ),
            cause(
                "your home network uses the same address range as the office",
                "家庭网络与公司网络网段冲突",
                "change your home router to another subnet such as 192.168.50.0/24",
                "请将家用路由器改为其他网段，例如192.168.50.0/24",
                "connected to VPN at home but can't reach internal sites",
                "在家连上VPN后内网网站都打不开",
            ),
            cause(
                "the computer clock differs from the server time by more than five minutes",
                "电脑时间与服务器相差超过五分钟",
                "turn on automatic time synchronisation",
                "请开启自动时间同步",
                "VPN fails and my laptop shows the wrong time",
                "电脑时间不准导致VPN连接失败",
            ),
            cause(
                "the client is older than the minimum version",
                "客户端版本低于最低要求",
                "update SecureLink from Software Center",
                "请在软件中心更新SecureLink",
                "the VPN app says it must be upgraded before it connects",
                "VPN软件提示要先升级才能连",
            ),
            cause(
                "the hotel or airport network blocks the VPN port",
                "酒店或机场网络屏蔽了VPN端口",
                "switch to the TCP 443 fallback in the settings",
                "请在设置中切换到TCP 443备用模式",
                "VPN doesn't work on hotel Wi-Fi",
                "在酒店连WiFi后VPN连不上",
            ),
        ],
    ),
    App(
        Name("DocFlow", "审批流系统"),
        "DF",
        Name(
            "DocFlow routes contracts, purchase requests and forms for review and signature, "
            "step by step along the approval chain.",
            "审批流系统用于合同、采购申请和各类表单的审阅与签字，按审批链逐级流转。",
        ),
        [
            cause(
                "a required signature is missing",
                "缺少必需的签字",
                "add the signer in the routing panel",
                "请在流转面板中添加签字人",
                "DocFlow won't submit, says someone still has to sign",
                "审批流提交不了，说还缺人签字",
            ),
            cause(
                "the document is locked because another person is editing it",
                "文件正被他人编辑而被锁定",
                "wait or ask the editor to close it",
                "请等待或联系对方关闭文件",
                "can't edit the contract in DocFlow, a colleague has it open",
                "同事开着文件，我在审批流里改不了",
            ),
            cause(
                "the template version is outdated",
                "使用的模板版本已过期",
                "start again from the current template in the library",
                "请使用模板库中的最新模板重新发起",
                "DocFlow complains my form is an old version",
                "审批流提示我用的表格是旧版",
            ),
            cause(
                "the budget code on the request is invalid",
                "申请单上的预算编码无效",
                "ask finance for the correct budget code",
                "请向财务确认正确的预算编码",
                "purchase request bounced because of a wrong budget number",
                "采购申请因为预算编号不对被退回",
            ),
            cause(
                "the approval deadline has passed",
                "审批截止日期已过",
                "resubmit with a new due date",
                "请修改截止日期后重新提交",
                "my request expired before it got approved",
                "申请还没批完就过期了",
            ),
            cause(
                "the delegation to your deputy has expired",
                "您对代理人的授权已过期",
                "renew the delegation in your settings",
                "请在设置中重新授权",
                "my deputy can no longer approve on my behalf",
                "我的代理人没法替我审批了",
            ),
            cause(
                "an attachment is not a PDF",
                "附件不是PDF格式",
                "export the file as PDF and upload it again",
                "请导出为PDF后重新上传",
                "DocFlow won't accept my Word file",
                "审批流不接受Word文件",
            ),
            cause(
                "the approver has left the company",
                "审批人已离职",
                "ask the process owner to reassign the step",
                "请联系流程负责人重新指派",
                "my contract is stuck with a manager who no longer works here",
                "合同卡在一个已经离职的领导那里",
            ),
        ],
    ),
    App(
        Name("MailGate", "邮件网关"),
        "MG",
        Name(
            "MailGate filters all incoming and outgoing e-mail for spam, malware and data "
            "leaks before it reaches a mailbox.",
            "邮件网关会在邮件到达邮箱前过滤所有收发邮件中的垃圾邮件、恶意软件和数据泄露风险。",
        ),
        [
            cause(
                "the recipient's mailbox is full",
                "收件人邮箱已满",
                "contact the recipient another way",
                "请通过其他方式联系收件人",
                "my email bounced because the other person's inbox has no space",
                "邮件被退回，说对方邮箱没空间了",
            ),
            cause(
                "an attachment type such as .exe is blocked",
                "附件类型（如.exe）被拦截",
                "share the file through the company drive instead",
                "请改用公司网盘分享文件",
                "can't send a program file by email",
                "发不出带程序文件的邮件",
            ),
            cause(
                "automatic forwarding to an external address is disabled",
                "自动转发到外部邮箱已被禁用",
                "remove the forwarding rule",
                "请删除该转发规则",
                "my rule to forward mail to my personal address stopped working",
                "设置的自动转发到私人邮箱不起作用了",
            ),
            cause(
                "the message has more than 500 recipients",
                "邮件收件人超过500人",
                "use a distribution list",
                "请改用邮件组发送",
                "can't email the whole company at once, too many addresses",
                "群发邮件人数太多发不出去",
            ),
            cause(
                "the message is larger than 25 MB",
                "邮件大小超过25MB",
                "send a link to the file instead",
                "请改为发送文件链接",
                "email with big attachments won't go out",
                "带大附件的邮件发送失败",
            ),
            cause(
                "the sender address looks spoofed",
                "发件人地址疑似伪造",
                "report the message as phishing",
                "请将邮件作为钓鱼邮件举报",
                "got a warning that an email pretending to be from my boss was quarantined",
                "收到提示说一封冒充领导的邮件被隔离了",
            ),
            cause(
                "the recipient's domain is on the block list",
                "收件人域名在黑名单中",
                "ask the security team to review the domain",
                "请联系安全团队审核该域名",
                "emails to one particular customer never arrive",
                "发给某个客户的邮件一直发不到",
            ),
            cause(
                "the message contains an unencrypted ID number",
                "邮件中含有未加密的身份证号",
                "send it with the Encrypt button",
                "请使用“加密”按钮发送",
                "MailGate blocked my email with a colleague's ID card number in it",
                "邮件里有员工身份证号被拦下来了",
            ),
        ],
    ),
]


def errors(b: Builder) -> None:
    family = "error"
    for app in APPS:
        numbers = b.rng.sample(range(100, 10000), len(app.causes))
        for number, (cause, fix, symptom) in zip(numbers, app.causes, strict=True):
            code = f"{app.prefix}-{number}"
            if b.language() == "en":
                doc = b.doc(
                    f"error-{code.lower()}",
                    "en",
                    family,
                    f"Error {code} in {app.name.en}",
                    f"{app.name.en} shows error {code} when {cause.en}. To fix it, {fix.en}. If "
                    "the error persists, contact the IT service desk with a screenshot.",
                )
            else:
                doc = b.doc(
                    f"error-{code.lower()}",
                    "zh",
                    family,
                    f"{app.name.zh}报错{code}",
                    f"当{cause.zh}时，{app.name.zh}会提示错误{code}。处理方法：{fix.zh}。如问题仍"
                    "未解决，请截图联系IT服务台。",
                )
            b.fact(
                doc,
                family,
                en=([f"What does error {code} mean?", f"{app.name.en} error {code}"], []),
                zh=([f"{code}错误是什么意思", f"{app.name.zh}报错{code}怎么办"], []),
            )
            b.fact(doc, family, en=([], [symptom.en]), zh=([], [symptom.zh]))


def app_overviews(b: Builder) -> None:
    for app in APPS:
        if b.language() == "en":
            b.doc(
                f"about-{app.prefix.lower()}",
                "en",
                "notice",
                f"About {app.name.en}",
                f"{app.about.en} When something goes wrong it shows an error code such as "
                f"{app.prefix}-1234; search this knowledge base for the code, or contact the "
                "IT service desk.",
            )
        else:
            b.doc(
                f"about-{app.prefix.lower()}",
                "zh",
                "notice",
                f"{app.name.zh}简介",
                f"{app.about.zh}出现问题时会显示错误代码，例如{app.prefix}-1234；请在知识库中按"
                "代码搜索，或联系IT服务台。",
            )
        date = f"{b.pick(range(1, 13))}/{b.pick(range(1, 29))}"
        if b.language() == "en":
            b.doc(
                f"maintenance-{app.prefix.lower()}",
                "en",
                "notice",
                f"Planned maintenance: {app.name.en}",
                f"{app.name.en} will be unavailable on {date} from 22:00 to 02:00 for an "
                "upgrade. Save your work before then; requests submitted during the window are "
                "rejected and must be sent again.",
            )
        else:
            b.doc(
                f"maintenance-{app.prefix.lower()}",
                "zh",
                "notice",
                f"{app.name.zh}计划维护通知",
                f"{app.name.zh}将于{date}日22:00至次日02:00停机升级。请提前保存工作；维护期间"
                "提交的请求会被拒绝，需要重新提交。",
            )


class System(NamedTuple):
    name: str
    device: Name  # how a user names the machine
    vpn: Name
    mail: Name


SYSTEMS = [
    System(
        "Windows",
        Name("Windows laptop", "Windows电脑"),
        Name(
            "Open Software Center, search for SecureLink and click Install. After a restart, "
            "sign in with your domain account and approve the MFA prompt.",
            "打开软件中心，搜索SecureLink并点击安装。重启后使用域账号登录并确认MFA请求。",
        ),
        Name(
            "Outlook is preinstalled: open it and sign in with your company address; the "
            "mailbox and calendar appear after a few minutes.",
            "电脑已预装Outlook：打开后用公司邮箱地址登录，几分钟后即可看到邮箱和日历。",
        ),
    ),
    System(
        "macOS",
        Name("Mac", "Mac电脑"),
        Name(
            "Open Self Service, install SecureLink and allow its system extension in System "
            "Settings > Privacy & Security. Then sign in with your domain account.",
            "打开Self Service安装SecureLink，并在“系统设置 > 隐私与安全性”中允许其系统扩展，然后"
            "用域账号登录。",
        ),
        Name(
            "Install Microsoft Outlook from Self Service and sign in with your company address. "
            "Apple Mail is not supported.",
            "请从Self Service安装Microsoft Outlook并用公司邮箱地址登录。不支持苹果自带的邮件应用。",
        ),
    ),
    System(
        "Ubuntu",
        Name("Linux machine", "Linux电脑"),
        Name(
            "Download the .deb package from the IT portal, install it with "
            "sudo apt install ./securelink.deb and run securelink connect.",
            "从IT门户下载.deb安装包，使用sudo apt install ./securelink.deb安装，然后运行"
            "securelink connect。",
        ),
        Name(
            "Use Outlook on the web in a browser; desktop mail clients are not supported on Linux.",
            "请在浏览器中使用Outlook网页版；Linux上不支持桌面邮件客户端。",
        ),
    ),
    System(
        "iOS",
        Name("iPhone", "iPhone"),
        Name(
            "Install SecureLink from the company app store in the Company Portal, then allow "
            "it to add VPN configurations.",
            "在公司门户的企业应用商店中安装SecureLink，然后允许其添加VPN配置。",
        ),
        Name(
            "Install Outlook from the Company Portal; the built-in Mail app is blocked for "
            "company accounts.",
            "请从公司门户安装Outlook；系统自带的邮件应用无法登录公司账号。",
        ),
    ),
    System(
        "Android",
        Name("Android phone", "安卓手机"),
        Name(
            "Install SecureLink from the managed Google Play in your work profile and sign in "
            "with your domain account.",
            "在工作资料的托管Google Play中安装SecureLink，并使用域账号登录。",
        ),
        Name(
            "Install Outlook from the managed Google Play in your work profile and sign in with "
            "your company address.",
            "在工作资料的托管Google Play中安装Outlook，并用公司邮箱地址登录。",
        ),
    ),
]


def systems(b: Builder) -> None:
    family = "it"
    for system in SYSTEMS:
        os, device = system.name, system.device
        if b.language() == "en":
            vpn = b.doc(
                f"it-vpn-{os.lower()}",
                "en",
                family,
                f"Install SecureLink VPN on {os}",
                system.vpn.en,
            )
        else:
            vpn = b.doc(
                f"it-vpn-{os.lower()}", "zh", family, f"在{os}上安装SecureLink VPN", system.vpn.zh
            )
        if b.language() == "en":
            mail = b.doc(
                f"it-mail-{os.lower()}", "en", family, f"Company email on {os}", system.mail.en
            )
        else:
            mail = b.doc(
                f"it-mail-{os.lower()}", "zh", family, f"在{os}上配置公司邮箱", system.mail.zh
            )
        b.fact(
            vpn,
            family,
            en=(
                [f"install SecureLink VPN on {os}"],
                [f"How do I get remote access to the company network from my {device.en}?"],
            ),
            zh=([f"{os}安装SecureLink VPN"], [f"{device.zh}在家怎么连公司内网"]),
        )
        b.fact(
            mail,
            family,
            en=(
                [f"set up company email on {os}"],
                [f"How can I read work mail on my {device.en}?"],
            ),
            zh=([f"{os}配置公司邮箱"], [f"{device.zh}上怎么收公司邮件"]),
        )
