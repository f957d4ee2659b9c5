"""How ``meshllm audit`` shows verification reports (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from services.audit.records import iso
from services.audit.verify import Problem, ProofReport, StoreReport


def _where(problem: Problem) -> str:
    if problem.leaf_index is None:
        return "-"
    if problem.end_index is not None:
        return f"{problem.leaf_index}..{problem.end_index - 1}"
    return str(problem.leaf_index)


def _problems(console: Console, first: Problem | None, problems: list[Problem]) -> None:
    if first is None:
        return
    headline = f"[bold red]FIRST PROBLEM[/bold red] ({first.kind}): {escape(first.message)}"
    console.print(headline)
    table = Table(title="problems", show_lines=False)
    table.add_column("kind", no_wrap=True)
    table.add_column("leaf", no_wrap=True)
    table.add_column("event id", no_wrap=True)
    table.add_column("what")
    for problem in problems:
        table.add_row(
            str(problem.kind), _where(problem), problem.event_id or "-", escape(problem.message)
        )
    console.print(table)


def print_store_report(console: Console, report: StoreReport) -> None:
    summary = Table.grid(padding=(0, 2))
    summary.add_row("log", escape(report.log_id))
    summary.add_row("records", f"{report.records} (next leaf {report.tree_size})")
    summary.add_row("purged", str(report.purged))
    summary.add_row("seals checked", str(report.seals_checked))
    summary.add_row(
        "checkpoints",
        f"{report.checkpoints} ({report.checkpoints_valid} validly signed, "
        f"{report.checkpoints_matched} matching the records)",
    )
    summary.add_row("verified up to", f"size {report.covered_size}")
    if report.root:
        summary.add_row("recomputed root", report.root.hex())
    console.print(summary)
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    if report.ok:
        console.print("[bold green]OK[/bold green]: every record and checkpoint verifies")
    else:
        _problems(console, report.first_problem, report.problems)


def print_proof_report(console: Console, report: ProofReport) -> None:
    if report.record is not None:
        record = report.record
        console.print(
            f"record: leaf {record.leaf_index}, event {record.event_id}, tenant "
            f"{escape(record.tenant)}, {record.kind}, occurred {iso(record.occurred_at_ns)}"
            + (" [yellow](purged)[/yellow]" if record.purged else "")
        )
    for checkpoint in report.checkpoints:
        console.print(
            f"checkpoint: size {checkpoint.tree_size}, root {checkpoint.root_hash.hex()}, "
            f"signed {iso(checkpoint.timestamp_ns)} by key {checkpoint.key_id}"
        )
    if report.inclusion is not None:
        console.print(f"inclusion proof: {len(report.inclusion.path)} hashes")
    if report.consistency is not None:
        console.print(f"consistency proof: {len(report.consistency.path)} hashes")
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    if report.ok:
        console.print("[bold green]OK[/bold green]: the proof verifies against the signed root")
    else:
        _problems(console, report.first_problem, report.problems)
