"""What the benchmarks share when they report: tables for the terminal and the results
files, and a description of the machine the numbers were measured on."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from rich.console import Console
from rich.table import Table


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table (cells are written as they are)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def rich_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> Table:
    """The same table for a terminal."""
    table = Table(title=title)
    for header in headers:
        table.add_column(header)
    for row in rows:
        table.add_row(*row)
    return table


def results_console(width: int = 200) -> Console:
    """A console for result tables: ``width`` columns when output is not a terminal (a log
    or a pipe), where rich would otherwise wrap the tables at 80."""
    console = Console()
    return console if console.is_terminal else Console(width=width)


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "unknown CPU"
    return next(
        (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
        "unknown CPU",
    )


def package_version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_lines(*, load: bool = False) -> list[str]:
    """CPUs and platform; with ``load``, the load averages now (before a run)."""
    cpus = f"nproc: {len(os.sched_getaffinity(0))} ({cpu_model()})"
    if load:
        cpus += "; load average before the run: " + ", ".join(
            f"{value:.2f}" for value in os.getloadavg()
        )
    return [cpus, f"platform: {platform.platform()}, Python {platform.python_version()}"]
