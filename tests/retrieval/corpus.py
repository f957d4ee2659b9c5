"""A small bilingual knowledge base (company policies) and questions that paraphrase it."""

from __future__ import annotations

ENGLISH = {
    "vacation": (
        "Annual leave",
        "Full-time employees accrue 20 days of paid vacation per year. Requests must be "
        "submitted in the HR portal at least two weeks in advance and approved by your line "
        "manager. Up to five unused days can be carried over into the next year.",
    ),
    "expenses": (
        "Travel expenses",
        "Hotel costs are reimbursed up to 200 dollars per night. Keep every receipt and file "
        "the expense report within 30 days of returning from the trip; the finance team pays "
        "approved claims with the next salary.",
    ),
    "remote-access": (
        "Remote access",
        "To reach internal systems from home, connect through the company VPN using the "
        "GlobalConnect client and your hardware token. If the connection fails, restart the "
        "client and check that your token's clock is synchronized.",
    ),
    "phishing": (
        "Phishing",
        "If you receive a suspicious email asking for your password, do not click any link. "
        "Report it with the Report Phish button and delete it; the security team answers "
        "within fifteen minutes.",
    ),
    "parking": (
        "Parking",
        "Employees may park in garage B with their badge. Visitors must register at reception "
        "to receive a day pass; electric vehicle chargers are on level 2.",
    ),
}

CHINESE = {
    "annual-leave-zh": (
        "员工年假政策",
        "入职满一年的正式员工每年享有十天带薪年假，满五年后增加到十五天。年假需要提前两周在人事"
        "系统中申请，并由直属经理批准。当年未休完的年假最多可以顺延到次年三月底。",
    ),
    "maternity-zh": (
        "产假与陪产假",
        "女职工生育可享受一百五十八天产假，难产或多胞胎生育的可增加天数。男职工在配偶生育期间"
        "可享受十五天陪产假。休假期间工资照常发放，社会保险由公司继续缴纳。",
    ),
    "canteen-zh": (
        "员工食堂安排",
        "公司食堂提供早餐、午餐和晚餐，午餐时间为十一点半到一点半。员工刷工卡就餐，公司每月"
        "补贴四百元餐费。食堂每周公布菜单，并提供素食和清真窗口。",
    ),
    "backup-zh": (
        "数据备份与恢复",
        "生产数据库每天凌晨两点进行全量备份，每小时进行一次增量备份。备份文件加密后保存在异地"
        "机房，保留期为九十天。发生故障时，运维团队会根据恢复预案在四小时内恢复服务。",
    ),
    "procurement-zh": (
        "采购审批流程",
        "单笔金额低于五千元的办公用品采购由部门经理审批；五千元至五万元需要财务总监审批；超过"
        "五万元的采购必须经过招标并由总经理签字。所有采购合同需在法务部备案。",
    ),
}

DOCUMENTS = {**ENGLISH, **CHINESE}

# (question, the document that answers it); worded unlike the documents on purpose
PARAPHRASED = [
    ("How much time off do I get every year?", "vacation"),
    ("what is the maximum I can claim for a hotel room", "expenses"),
    ("I cannot open the intranet while working from my house", "remote-access"),
    ("someone sent me a fake message trying to steal my login", "phishing"),
    ("where should a guest leave their car", "parking"),
    ("生孩子可以休多少天假", "maternity-zh"),
    ("中午几点可以去吃饭", "canteen-zh"),
    ("服务器数据丢了多久能找回来", "backup-zh"),
    ("买电脑花了八万块要谁签字", "procurement-zh"),
]
